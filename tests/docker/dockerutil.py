"""Helpers of the Docker tests: the skip/fail rule, subprocess wrappers, free ports, the optional pip CA
bundle, and waiting for Docker's own health status.

Skip/fail rule: without a Docker engine, docker-compose or the base image the tests skip, except under
CI, where they fail: CI must not go green by skipping them.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import socket
import subprocess
import time
from types import ModuleType

import pytest
import yaml

from tests.helpers import REPO

BASE_IMAGE = os.environ.get("DEEPGEN_TEST_BASE_IMAGE", "local/debian:bookworm")
HEALTHY_WITHIN_S = 300.0
# Only these variables of the caller's environment reach docker-compose, so a developer's settings or
# .env cannot change what the tests run (the tests also replace the .env file by an empty one).
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CERT_PATH")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str, fix: str = "scripts/docker-env.sh prepares the engine") -> None:
    """Skip, or fail under CI (`fix` says how to provide what is missing)."""
    if in_ci():
        pytest.fail(f"{reason}; CI is set, so these tests must run ({fix})")
    pytest.skip(reason)


def run(args: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def check(args: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """stdout of a command that must succeed; the test fails with its output otherwise."""
    done = run(args, timeout, env)
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-4000:]
        pytest.fail(f"{' '.join(args[:6])} ... exited {done.returncode}:\n{output}")
    return done.stdout


def container_logs(container: str) -> str:
    done = run(["docker", "logs", "--tail", "40", container], timeout=30)
    return (done.stdout + done.stderr)[-4000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_range(n: int) -> str:
    """`first-last`: n consecutive ports free on 127.0.0.1 now (a compose publish range)."""
    for _ in range(200):
        first = random.randrange(20000, 30000 - n)
        try:
            for port in range(first, first + n):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return f"{first}-{first + n - 1}"
    raise RuntimeError(f"no {n} consecutive free ports in 20000-30000")


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_pip_ca = _script("pip_ca")


def pip_ca_bundle() -> str:
    """The CA bundle pip trusts on this machine, copied into the build context as `make pip-ca` does
    (scripts/pip_ca.py); "" when pip uses its own store (the image then builds with plain PyPI)."""
    return _pip_ca.prepare_bundle(REPO, os.environ, _pip_ca.pip_config_listing())


def build_service_image(service: str, tag: str) -> float:
    """Build `service`'s image as `tag` on BASE_IMAGE: the shared Dockerfile and the build args that
    docker-compose.yml gives that service (so a test builds what compose builds). Returns the seconds."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    build = compose["services"][service]["build"]
    args = ["-f", build["dockerfile"]]
    for key, value in build["args"].items():
        if "${" not in str(value):  # the interpolated ones are given below
            args += ["--build-arg", f"{key}={value}"]
    args += ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", f"PIP_CA_BUNDLE={pip_ca_bundle()}"]
    start = time.monotonic()
    check(["docker", "build", *args, "-t", tag, str(REPO)], timeout=900)
    return time.monotonic() - start


def require_docker_engine() -> None:
    """docker, docker-compose, a running engine and BASE_IMAGE; otherwise skip (fail under CI)."""
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed")
    try:
        info = run(["docker", "info"], timeout=30)
    except subprocess.TimeoutExpired:
        unavailable("`docker info` did not answer within 30 s")
    if info.returncode != 0:
        unavailable(f"no Docker engine (`docker info`: {info.stderr.strip()[-300:]})")
    if run(["docker", "image", "inspect", BASE_IMAGE], timeout=30).returncode != 0:
        unavailable(f"base image {BASE_IMAGE} is missing (scripts/docker-env.sh builds local/debian:bookworm)")


def wait_health(container: str, want: str = "healthy", within_s: float = HEALTHY_WITHIN_S) -> float:
    """Seconds until Docker reports the container's health as `want` (its own HEALTHCHECK, not a probe of
    ours); the test fails when the container stops running or the time runs out."""
    start = time.monotonic()
    status = ""
    while time.monotonic() - start < within_s:
        fmt = "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}"
        status = check(["docker", "inspect", "-f", fmt, container], timeout=30).strip()
        if status == f"running {want}":
            return time.monotonic() - start
        if not status.startswith("running"):
            pytest.fail(f"container {container} is {status!r}:\n{container_logs(container)}")
        time.sleep(1.0)
    pytest.fail(f"container {container} not {want} after {within_s:.0f} s ({status!r}):\n{container_logs(container)}")
