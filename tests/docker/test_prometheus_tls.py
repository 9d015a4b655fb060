"""The compose stack's Prometheus scrapes reward-ocr under token + mutual TLS on a real Docker engine:
reward-ocr and Prometheus start from docker-compose.yml with PROMETHEUS_CONFIG=prometheus-tls.yml and the
certificates of `make certs`, and Prometheus' own HTTP API reports the target up and its deepgen_ metrics.
Prometheus' own `promtool` accepts both scrape configs of monitoring/.

Debian's `prometheus` package (2.42) stands in for the prom/prometheus image, because Docker Hub is
unreachable here: the stand-in is built FROM the base image, runs as nobody (uid 65534) like the real
image, and is tagged prom/prometheus:<STAND_IN_TAG>, so that PROMETHEUS_IMAGE_TAG picks it and the
compose file's own prometheus service (command, mounts, healthcheck) runs unchanged. 2.42 is older than
the pinned v3.5.0; the config uses nothing newer than `tls_config.server_name` and DNS discovery.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.docker.dockerutil import BASE_IMAGE, check, container_logs, free_port, require_docker_engine, wait_health
from tests.docker.test_compose import SECURE_SETTINGS, load_make_certs, started_stack
from tests.helpers import REPO

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1200)]

STAND_IN_TAG = "deepgen-test-debian"
STAND_IN_DOCKERFILE = f"""
FROM {BASE_IMAGE}
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget \\
    && apt-get clean && rm -rf /var/lib/apt/lists/*
RUN mkdir /prometheus && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
"""
# The job's first scrape comes within one scrape_interval (15 s) of its discovery; one more for slack.
SCRAPED_WITHIN_S = 45.0


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The Debian Prometheus image, built as prom/prometheus:STAND_IN_TAG (from the build cache after the
    first run)."""
    require_docker_engine()
    context = tmp_path_factory.mktemp("prometheus-image")
    (context / "Dockerfile").write_text(STAND_IN_DOCKERFILE)
    image = f"prom/prometheus:{STAND_IN_TAG}"
    log.info("stand-in Prometheus image %s", check(["docker", "build", "-q", "-t", image, str(context)], 600).strip())
    return image


@pytest.fixture
def certs(tmp_path: Path) -> Any:
    """`make certs` output (server.pem names `reward-ocr` by default), keys readable by every uid: the
    service runs as 10001 and Prometheus as 65534 (on a real host, chown each key to its reader)."""
    files = load_make_certs().make_certs(tmp_path / "certs", [])
    for key in (files.server_key, files.prometheus_key):
        key.chmod(0o644)
    return files


def query(port: int, promql: str) -> list[dict[str, Any]]:
    """The result vector of an instant query through Prometheus' HTTP API."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def targets(port: int, job: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets?state=active", timeout=10) as response:
        active = json.loads(response.read())["data"]["activeTargets"]
    return [t for t in active if t["labels"]["job"] == job]


@pytest.mark.parametrize("config_name", ["prometheus.yml", "prometheus-tls.yml"])
def test_promtool_accepts_the_config(stand_in: str, certs: Any, config_name: str) -> None:
    """`promtool check config` of the stand-in's Prometheus, with monitoring/ and the certificates mounted
    where compose mounts them (it also checks that the tls_config files exist)."""
    args = ["docker", "run", "--rm", "--entrypoint", "promtool"]
    args += ["-v", f"{REPO / 'monitoring'}:/etc/prometheus/deepgen:ro", "-v", f"{certs.ca_cert.parent}:/certs:ro"]
    check([*args, stand_in, "check", "config", f"/etc/prometheus/deepgen/{config_name}"], timeout=120)


def test_prometheus_scrapes_reward_ocr_over_mutual_tls(stand_in: str, certs: Any) -> None:
    """reward-ocr with API_TOKEN + mutual TLS, compose's prometheus with PROMETHEUS_CONFIG=prometheus-tls.yml:
    the target is up over https with no scrape error, and reward-ocr's deepgen_ metrics are stored."""
    prometheus_port = free_port()
    settings = {
        "CERTS_DIR": str(certs.ca_cert.parent),
        **SECURE_SETTINGS,
        "PROMETHEUS_CONFIG": "prometheus-tls.yml",
        "PROMETHEUS_IMAGE_TAG": STAND_IN_TAG,
        "PROMETHEUS_PUBLISH_PORT": str(prometheus_port),
    }
    with started_stack(**settings) as stack:  # reward-ocr healthy (its TLS-aware healthcheck)
        stack.compose("--profile", "monitoring", "up", "-d", "--no-deps", "prometheus", timeout=120)
        container = stack.compose("--profile", "monitoring", "ps", "-q", "prometheus", timeout=60).stdout.strip()
        wait_health(container, within_s=120)
        start = time.monotonic()
        while not (up := query(prometheus_port, 'up{job="reward-ocr"}')) or up[0]["value"][1] != "1":
            if time.monotonic() - start > SCRAPED_WITHIN_S:
                pytest.fail(
                    f"up{{job='reward-ocr'}} = {up} after {SCRAPED_WITHIN_S:.0f} s; targets: "
                    f"{targets(prometheus_port, 'reward-ocr')}\n{container_logs(container)}"
                )
            time.sleep(1.0)
        log.info("reward-ocr up in Prometheus after %.1f s", time.monotonic() - start)

        (target,) = targets(prometheus_port, "reward-ocr")
        assert target["scrapeUrl"].startswith("https://"), target
        assert target["health"] == "up", target
        assert target["lastError"] == "", target
        (info,) = query(prometheus_port, 'deepgen_service_info{job="reward-ocr"}')
        assert info["metric"]["name"] == "reward-ocr", info
        assert query(prometheus_port, 'deepgen_queue_depth{job="reward-ocr"}'), "no deepgen_queue_depth"
