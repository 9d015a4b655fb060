"""The monitoring configuration: monitoring/prometheus.yml scrapes every service of docker-compose.yml
(and the trainer) through DNS service discovery, monitoring/prometheus-tls.yml scrapes the same jobs with
the services that serve TLS over HTTPS (the CA and client certificate that compose mounts and
`make certs` writes), and the Grafana dashboard and provisioning parse and query metric names the
services and the trainer really export (their real Prometheus registries).

No Docker here: docker-compose resolving the `monitoring` profile is in tests/docker/test_trainer_compose.py,
Prometheus scraping reward-ocr under mutual TLS in tests/docker/test_prometheus_tls.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from deepgen_common.metrics import ServiceMetrics
from deepgen_trainer.observe.tracking import Tracker
from eval_unigenbench.runs import UniGenBenchEval
from eval_unigenbench.settings import EvalSettings
from reward_unified.backend import UnifiedBackend
from reward_unified.settings import UnifiedSettings
from tests.common.test_auth_tls import load_make_certs
from tests.helpers import REPO

MONITORING = REPO / "monitoring"
PLAIN_CONFIG, TLS_CONFIG = "prometheus.yml", "prometheus-tls.yml"  # the values of PROMETHEUS_CONFIG
# Step metrics of the trainer (DESIGN §4), the `name` label of deepgen_trainer_metric; `<r>` stands for a
# reward name (or an evaluated set).
TRAINER_METRIC_NAMES = [
    *(f"reward/<r>/{s}" for s in ("mean", "std", "fail_rate", "na_rate")),
    "reward/total",
    *(f"adv/{s}" for s in ("mean", "std", "clamp_frac")),
    *(f"policy/{s}" for s in ("loss", "clipfrac", "ratio_mean", "approx_kl", "kl")),
    "sft/loss",
    *(f"time/{s}" for s in ("rollout", "reward", "update", "eval", "step")),
    "perf/images_per_sec",
    "perf/images_per_sec_per_gpu",
    "lr",
    "grad_norm",
    "eval/<r>/overall",
    "eval/<r>/pooled",
]
NOT_SCRAPED = {"prometheus", "grafana"}  # the monitoring itself (Prometheus scrapes no one else here)


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def prometheus_config(name: str = PLAIN_CONFIG) -> dict[str, Any]:
    return yaml.safe_load((MONITORING / name).read_text())


def prometheus_jobs(name: str = PLAIN_CONFIG) -> dict[str, dict[str, Any]]:
    config = prometheus_config(name)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "duplicate job names"
    return jobs


def default_of(value: str) -> str:
    """The default of a `${VAR:-default}` value, or the value itself."""
    match = re.fullmatch(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", value)
    return match.group(1) if match else value


def metrics_port(name: str, service: dict[str, Any]) -> int:
    """The container port of `service`'s /metrics, from docker-compose.yml itself."""
    if name == "trainer":
        return int(default_of(service["environment"]["METRICS_PORT"]))
    if "vllm/vllm-openai" in service["image"]:
        command = service["command"]
        return int(command[command.index("--port") + 1])
    return int(service["environment"]["HTTP_PORT"])  # the reward/eval services: /metrics on HTTP


@pytest.mark.parametrize("config_name", [PLAIN_CONFIG, TLS_CONFIG])
def test_every_compose_service_has_a_dns_discovered_job(config_name: str):
    jobs = prometheus_jobs(config_name)
    services = compose()["services"]
    scraped = set(services) - NOT_SCRAPED - {"reward-ocr-replica"}
    assert set(jobs) == scraped, set(jobs) ^ scraped
    for name in scraped:
        (sd,) = jobs[name]["dns_sd_configs"]
        assert sd["names"] == [name]
        assert sd["type"] == "A"  # one target per address: each replica separately
        assert sd["port"] == metrics_port(name, services[name]), name
    assert jobs["trainer"]["dns_sd_configs"][0]["port"] == 9400
    assert jobs["reward-ocr"]["dns_sd_configs"][0]["port"] == 18082


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source of each of `service`'s volumes (a source may be a `${VAR:-default}`)."""
    mounts = {}
    for volume in service["volumes"]:
        match = re.fullmatch(r"(.+):(/[^:]*)(?::ro|:rw)?", volume)
        assert match, f"unparsed volume {volume!r}"
        mounts[match.group(2)] = match.group(1)
    return mounts


def tls_services() -> set[str]:
    """Compose services that serve TLS when TLS_CERT_FILE is set in .env."""
    return {name for name, s in compose()["services"].items() if "TLS_CERT_FILE" in s.get("environment", {})}


def test_tls_config_is_the_plain_config_over_https(tmp_path):
    """prometheus-tls.yml = prometheus.yml, except that every job of a service with TLS has scheme https
    and a tls_config: the CA and Prometheus' client certificate at the paths where compose mounts
    CERTS_DIR and under the names `make certs` writes, and the compose name the server certificate holds."""
    plain, tls = prometheus_config(PLAIN_CONFIG), prometheus_config(TLS_CONFIG)
    assert {k: v for k, v in tls.items() if k != "scrape_configs"} == {
        k: v for k, v in plain.items() if k != "scrape_configs"
    }
    plain_jobs, tls_jobs = prometheus_jobs(PLAIN_CONFIG), prometheus_jobs(TLS_CONFIG)
    assert list(tls_jobs) == list(plain_jobs)
    secured = tls_services() & set(plain_jobs)
    assert secured == {"reward-ocr", "reward-unified", "eval-unigenbench"}

    services = compose()["services"]
    # The same CERTS_DIR as the services', at the folder the tls_config paths name.
    assert volume_mounts(services["prometheus"])["/certs"] == volume_mounts(services["reward-ocr"])["/certs"]
    certs = load_make_certs().make_certs(tmp_path, [])
    for name, job in tls_jobs.items():
        expected = plain_jobs[name]
        if name in secured:
            tls_config = {
                "ca_file": f"/certs/{certs.ca_cert.name}",
                "cert_file": f"/certs/{certs.prometheus_cert.name}",
                "key_file": f"/certs/{certs.prometheus_key.name}",
                "server_name": name,
            }
            expected = {**expected, "scheme": "https", "tls_config": tls_config}
        assert job == expected, name

    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert secured <= set(san.get_values_for_type(x509.DNSName))  # each job's server_name
    client = x509.load_pem_x509_certificate(certs.prometheus_cert.read_bytes())
    client.verify_directly_issued_by(ca)
    assert ExtendedKeyUsageOID.CLIENT_AUTH in client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value


def test_compose_mounts_the_config_that_prometheus_config_names():
    prometheus = compose()["services"]["prometheus"]
    (flag,) = [c for c in prometheus["command"] if c.startswith("--config.file=")]
    folder, _, choice = flag.removeprefix("--config.file=").rpartition("/")
    assert volume_mounts(prometheus)[folder] == "./monitoring"
    assert choice == "${PROMETHEUS_CONFIG:-prometheus.yml}"
    assert default_of(choice) == PLAIN_CONFIG
    env_example = (REPO / ".env.example").read_text()
    assert re.search(rf"^PROMETHEUS_CONFIG={re.escape(PLAIN_CONFIG)}$", env_example, flags=re.MULTILINE)
    for name in (PLAIN_CONFIG, TLS_CONFIG):
        assert (MONITORING / name).is_file(), name


def test_ocr_replicas_are_covered_by_the_reward_ocr_job():
    replica = compose()["services"]["reward-ocr-replica"]
    assert "reward-ocr" in replica["networks"]["default"]["aliases"]


def exported_metric_names() -> set[str]:
    """Sample names (`_total`, `_bucket`, ...) of every metric family the services and the trainer
    register, from their real registries."""
    registries = []
    unified = ServiceMetrics()
    UnifiedBackend(UnifiedSettings(), unified)
    registries.append(unified.registry)
    unigenbench = ServiceMetrics()
    UniGenBenchEval(EvalSettings(), unigenbench)
    registries.append(unigenbench.registry)
    registries.append(Tracker(("none",)).registry)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""], "info": ["_info"]}
    return {
        family.name + suffix
        for registry in registries
        for family in registry.collect()
        for suffix in suffixes[family.type]
    }


def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "grafana" / "dashboards" / "deepgen.json").read_text())


def dashboard_queries() -> list[str]:
    panels = dashboard()["panels"]
    queries = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert queries, "the dashboard has no queries"
    return queries


def test_dashboard_queries_use_exported_metric_names():
    exported = exported_metric_names()
    used = {name for q in dashboard_queries() for name in re.findall(r"\b(deepgen_[a-z_]+)", q)}
    assert used - exported == set(), f"unknown metrics {used - exported}; exported: {sorted(exported)}"
    for required in (
        "deepgen_trainer_metric",
        "deepgen_trainer_step",
        "deepgen_requests_total",
        "deepgen_request_seconds_bucket",
        "deepgen_judge_calls_total",
    ):
        assert required in used, required


@pytest.mark.parametrize(
    ("fragment", "meaning"),
    [
        ('deepgen_trainer_metric{name=~"time/.*"}', "step time breakdown"),
        ('deepgen_trainer_metric{name=~"reward/.*/mean"}', "rewards"),
        ("histogram_quantile(0.5, ", "latency p50"),
        ("histogram_quantile(0.99, ", "latency p99"),
        ('deepgen_requests_total{code!~"OK|200"}', "errors: neither gRPC OK nor HTTP 200"),
        ("deepgen_judge_calls_total", "judge calls by result"),
        ('deepgen_trainer_metric{name=~"eval/.*/(overall|pooled)"}', "UniGenBench Overall and pooled accuracy"),
    ],
)
def test_dashboard_has_the_panels(fragment: str, meaning: str):
    assert any(fragment in q for q in dashboard_queries()), meaning


def test_trainer_label_matchers_match_trainer_metrics():
    """Every `name` matcher of deepgen_trainer_metric selects at least one step metric of the trainer."""
    matchers = [
        (op, pattern)
        for q in dashboard_queries()
        for op, pattern in re.findall(r'deepgen_trainer_metric\{name(=~|=)"([^"]+)"\}', q)
    ]
    assert matchers
    names = [n.replace("<r>", "ocr") for n in TRAINER_METRIC_NAMES]
    for op, pattern in matchers:
        selected = [n for n in names if (re.fullmatch(pattern, n) if op == "=~" else n == pattern)]
        assert selected, f"name{op}{pattern!r} selects none of {names}"


def test_dashboard_panels_use_the_provisioned_datasource():
    datasources = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"  # the compose service
    board = dashboard()
    assert board["uid"]
    assert board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]


def test_dashboard_provider_reads_the_mounted_folder():
    providers = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "dashboards" / "deepgen.yml").read_text())
    (provider,) = providers["providers"]
    grafana = compose()["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts[provider["options"]["path"]] == "./monitoring/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./monitoring/grafana/provisioning"
