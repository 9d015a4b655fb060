"""The eval-unigenbench image on a real Docker engine, and the compose file's `eval` profile.

The image is built from docker/service.Dockerfile with the build args docker-compose.yml gives the service,
on the local base (with the optional pip CA bundle, like test_compose.py), and run with the project's judge
fixtures (tests/fixtures/judge_data, upstream formats) mounted read-only as compose mounts the fetched judge
data. No judge runs here (the 32B UniGenBench model needs GPUs; the judge path is covered by
tests/eval_unigenbench against a stand-in): the checks are what holds without one. The `eval` profile
and the sleep-mode override are checked with `docker-compose config` / `ps`: the vLLM image is not pulled.

Needs what test_compose.py needs; skips without it, fails under CI=true.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from eval_unigenbench.benchmark import load_benchmark
from tests.docker.dockerutil import (
    PASSED_ENV,
    build_service_image,
    check,
    container_logs,
    free_port,
    require_docker_engine,
    run,
    wait_health,
)
from tests.helpers import JUDGE_FIXTURES, REPO

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1200)]

IMAGE = "deepgen/eval-unigenbench:test"
SLEEP_FLAGS = ["--enable-sleep-mode", "--mm-processor-cache-gb", "0"]


@pytest.fixture(scope="module")
def docker_engine() -> None:
    require_docker_engine()


@pytest.fixture(scope="module")
def image(docker_engine: None) -> str:
    """deepgen/eval-unigenbench:test built on BASE_IMAGE; the tag stays (the next build reuses its layers)."""
    log.info("image build: %.1f s", build_service_image("eval-unigenbench", IMAGE))
    return IMAGE


@dataclass
class Service:
    container: str
    http_url: str


@pytest.fixture(scope="module")
def service(image: str) -> Iterator[Service]:
    """The image run as compose runs it (init, data read-only, published on 127.0.0.1), with a judge URL
    nobody answers. Docker probes every 2 s with a 1 s start period so that `unhealthy` shows within
    seconds; the probe command, timeout and retries stay the image's own."""
    http_port = free_port()
    name = f"deepgen-test-eval-{uuid.uuid4().hex[:8]}"
    env = {
        "JUDGE_URL": "http://127.0.0.1:9/v1",
        "JUDGE_HEALTH_POLL_S": "0.5",
        "LOG_FORMAT": "text",
        "HOST": "0.0.0.0",  # the container's interface (HOST defaults to loopback); -p publishes it on 127.0.0.1
    }
    try:
        check(
            [
                "docker",
                "run",
                "--detach",
                "--name",
                name,
                "--init",
                "--health-interval",
                "2s",
                "--health-start-period",
                "1s",
                "--publish",
                f"127.0.0.1:{http_port}:8000",
                "--volume",
                f"{JUDGE_FIXTURES / 'templates'}:/data/templates:ro",
                "--volume",
                f"{JUDGE_FIXTURES / 'unigenbench'}:/data/unigenbench:ro",
                *[arg for key, value in env.items() for arg in ("-e", f"{key}={value}")],
                image,
            ],
            timeout=120,
        )
        s = Service(name, f"http://127.0.0.1:{http_port}")
        deadline = time.monotonic() + 60
        while status(s.http_url, "/healthz") != 200:
            if time.monotonic() > deadline:
                pytest.fail(f"/healthz not 200 within 60 s:\n{container_logs(name)}")
            time.sleep(0.5)
        yield s
    finally:
        run(["docker", "rm", "--force", "--volumes", name], timeout=60)


def status(base_url: str, path: str) -> int:
    try:
        with urllib.request.urlopen(base_url + path, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError):
        return 0


def test_without_a_judge_it_is_live_but_not_ready(service: Service) -> None:
    log.info("unhealthy after %.1f s", wait_health(service.container, "unhealthy", within_s=60))
    assert status(service.http_url, "/readyz") == 503
    assert status(service.http_url, "/healthz") == 200


def test_serves_the_benchmark_prompts_without_a_judge(service: Service) -> None:
    with urllib.request.urlopen(f"{service.http_url}/v1/prompts", timeout=30) as response:
        body = json.loads(response.read())
    assert body["benchmark"] == "unigenbench-en"  # BENCHMARK=test_prompts_en, the default
    assert body["duplicates"] == 1
    served = load_benchmark(JUDGE_FIXTURES / "unigenbench" / "test_prompts_en.csv")  # the mounted fixture
    assert [(p["prompt_id"], p["prompt"]) for p in body["prompts"]] == [(i.prompt_id, i.prompt) for i in served.items]


def test_image_runs_unprivileged_without_torch_and_can_write_results(service: Service) -> None:
    assert check(["docker", "exec", service.container, "id", "-u"], timeout=30).strip() != "0"
    find_torch = "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)"
    assert run(["docker", "exec", service.container, "python", "-c", find_torch], timeout=60).returncode == 0
    assert run(["docker", "exec", service.container, "pip", "--version"], timeout=60).returncode != 0
    # RESULTS_DIR exists, owned by the service user: a named volume mounted there starts writable.
    touch = ["docker", "exec", service.container, "touch", "/data/results/probe"]
    assert run(touch, timeout=30).returncode == 0


def compose_config(*files: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`docker-compose config` (1.29) of the files with profiles `judges` + `eval` and an empty .env;
    `ps` loads the project as `up` does (device requests included) without starting anything."""
    base_env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty_env_file:
        cmd = ["docker-compose", "--env-file", empty_env_file.name]
        for file in files:
            cmd += ["-f", str(REPO / file)]
        cmd += ["-p", f"deepgen-test-{uuid.uuid4().hex[:8]}", "--profile", "judges", "--profile", "eval"]
        check([*cmd, "ps"], timeout=60, env=base_env)
        return yaml.safe_load(check([*cmd, "config"], timeout=60, env={**base_env, **(env or {})}))


def test_compose_eval_profile(docker_engine: None) -> None:
    config = compose_config("docker-compose.yml", env={"UNIGENBENCH_GPUS": "2,3", "UNIGENBENCH_TP": "2"})
    services = config["services"]
    judge, adapter = services["unigenbench-vllm"], services["eval-unigenbench"]
    assert judge["profiles"] == adapter["profiles"] == ["eval"]
    assert adapter["depends_on"] == {"unigenbench-vllm": {"condition": "service_healthy"}}
    assert adapter["build"]["dockerfile"] == "docker/service.Dockerfile"
    assert adapter["build"]["args"]["MODULE"] == "eval_unigenbench"

    command = judge["command"]

    def flag(name: str) -> str:
        return command[command.index(name) + 1]

    assert flag("--model") == "CodeGoat24/UniGenBench-EvalModel-qwen3vl-32b-v1"
    assert json.loads(flag("--limit-mm-per-prompt")) == {"image": 1}
    # The parallelism comes from the entrypoint (tests/test_compose_judges.py): tp over UNIGENBENCH_TP GPUs.
    assert (judge["environment"]["VLLM_PARALLEL_MODE"], judge["environment"]["VLLM_TENSOR_PARALLEL_SIZE"]) == (
        "tp",
        "2",
    )
    assert flag("--max-model-len") == "16384"
    assert "--enable-prefix-caching" in command
    assert not set(SLEEP_FLAGS[:2]) & set(command)  # sleep mode only with the override
    (device,) = judge["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "capabilities": ["gpu"], "device_ids": ["2,3"]}
    assert "http://127.0.0.1:8000/health" in judge["healthcheck"]["test"][-1]

    env = adapter["environment"]
    assert env["JUDGE_URL"] == "http://unigenbench-vllm:8000/v1"
    assert env["JUDGE_MODEL"] == flag("--served-model-name") == "UniGenBench-EvalModel-qwen3vl-32b-v1"
    assert (env["HTTP_PORT"], env["GRPC_PORT"], env["RESULTS_DIR"]) == ("8000", "50053", "/data/results")
    assert (env["BENCHMARK"], env["DUPLICATES"], env["PROMPT_LIMIT"]) == ("test_prompts_en", "1", "0")
    assert "SLEEP_BETWEEN_RUNS" not in env
    volumes = adapter["volumes"]
    assert any(v.endswith("/data/judges/templates:/data/templates:ro") for v in volumes), volumes
    assert any(v.endswith("/data/judges/unigenbench:/data/unigenbench:ro") for v in volumes), volumes
    assert any(v.startswith("eval-results:/data/results") for v in volumes), volumes
    assert sorted(adapter["ports"]) == ["127.0.0.1:50053:50053/tcp", "127.0.0.1:8000:8000/tcp"]


def test_compose_sleep_override(docker_engine: None) -> None:
    """The override adds the sleep flags to both judges (and keeps the rest of their commands as in
    docker-compose.yml: an override replaces a command list) and turns on the adapter's switching."""
    plain = compose_config("docker-compose.yml")["services"]
    config = compose_config("docker-compose.yml", "docker-compose.sleep.yml")["services"]
    for judge in ("unifiedreward-vllm", "unigenbench-vllm"):
        assert config[judge]["command"] == plain[judge]["command"] + SLEEP_FLAGS, judge
        assert config[judge]["environment"]["VLLM_SERVER_DEV_MODE"] == "1"
        assert config[judge]["environment"]["VLLM_NO_USAGE_STATS"] == "1"  # merged, not replaced
    adapter = config["eval-unigenbench"]
    assert adapter["environment"]["SLEEP_BETWEEN_RUNS"] == "true"
    assert adapter["environment"]["PEER_JUDGE_URL"] == "http://unifiedreward-vllm:8000"
    assert adapter["environment"]["JUDGE_URL"] == "http://unigenbench-vllm:8000/v1"
    assert adapter["depends_on"] == {
        "unigenbench-vllm": {"condition": "service_healthy"},
        "unifiedreward-vllm": {"condition": "service_healthy"},
    }
