"""A real vLLM server (CPU, tiny random Qwen2-VL) shared by the judge tests of one session."""

from __future__ import annotations

import os

import pytest

from tests.judges.vllm_server import VENV_SCRIPT, VLLM_VENV, VllmServer, venv_ready

# The names the two adapters use by default; one server answers to both.
SERVED_NAMES = ["UnifiedReward", "UniGenBench-EvalModel-qwen3vl-32b-v1"]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory):
    """Serves SERVED_NAMES on 127.0.0.1; tests that stop or kill it must restart() it before they end."""
    if not venv_ready():
        message = f"{VLLM_VENV} is not built: run {VENV_SCRIPT} (about 2 minutes, 2.5 GiB)"
        if _in_ci():
            pytest.fail(f"CI: {message}")
        pytest.skip(message)
    server = VllmServer(SERVED_NAMES, log_path=tmp_path_factory.mktemp("vllm") / "server.log")
    server.start()
    yield server
    server.stop()
