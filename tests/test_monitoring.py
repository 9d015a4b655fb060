"""The monitoring configuration: monitoring/prometheus.yml scrapes every service of docker-compose.yml
(and the trainer) through DNS service discovery, and the Grafana dashboard and provisioning parse and
query metric names the services and the trainer really export (their real Prometheus registries).

No Docker here: docker-compose resolving the `monitoring` profile is in tests/docker/test_trainer_compose.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from deepgen_common.metrics import ServiceMetrics
from deepgen_trainer.tracking import Tracker
from eval_unigenbench.runs import UniGenBenchEval
from eval_unigenbench.settings import EvalSettings
from reward_unified.backend import UnifiedBackend
from reward_unified.settings import UnifiedSettings
from tests.helpers import REPO

MONITORING = REPO / "monitoring"
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


def prometheus_jobs() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
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


def test_every_compose_service_has_a_dns_discovered_job():
    jobs = prometheus_jobs()
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
