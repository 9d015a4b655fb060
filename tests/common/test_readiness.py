"""Readiness says why: `/readyz` of reward-unified and eval-unigenbench names what is missing (the judge's URL
and its last health error), and the log says it at start and whenever it changes.

The judge is a stand-in here: a real HTTP server on 127.0.0.1 answering vLLM's `GET /health` (503 while
"loading", then 200), since what is checked is the adapters' readiness, not judging (the judge tests
under tests/judges run a real vLLM)."""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from deepgen_common.reward_api import reward_component
from eval_unigenbench.api import eval_component
from eval_unigenbench.settings import EvalSettings
from reward_unified.backend import UnifiedBackend
from reward_unified.settings import UnifiedSettings
from tests.helpers import JUDGE_FIXTURES, ServiceThread

pytestmark = pytest.mark.integration


class FakeVllmHealth:
    """`GET /health` of a vLLM server: answers `status` (503 with a body while loading, 200 when up)."""

    def __init__(self) -> None:
        self.status = 503
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"" if fake.status == 200 else b"model loading"
                self.send_response(fake.status if self.path == "/health" else 404)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root_url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge() -> Iterator[FakeVllmHealth]:
    fake = FakeVllmHealth()
    yield fake
    fake.stop()


def common_settings(judge_url: str) -> dict[str, object]:
    return {
        "host": "127.0.0.1",
        "http_port": 0,
        "grpc_port": 0,
        "log_format": "text",
        "judge_url": judge_url,
        "judge_health_poll_s": 0.1,
        "templates_dir": JUDGE_FIXTURES / "templates",
    }


def reward_unified(judge_url: str) -> ServiceThread:
    settings = UnifiedSettings(**common_settings(judge_url))
    return ServiceThread(settings, reward_component(UnifiedBackend)).start(wait_ready=False)


def eval_unigenbench(judge_url: str) -> ServiceThread:
    settings = EvalSettings(**common_settings(judge_url), unigenbench_data_dir=JUDGE_FIXTURES / "unigenbench")
    return ServiceThread(settings, eval_component).start(wait_ready=False)


def readyz_when(service: ServiceThread, predicate: Callable[[dict], bool], within_s: float = 30.0) -> dict:
    """The first /readyz body that satisfies predicate (polled), with its status code added."""
    deadline = time.monotonic() + within_s
    while True:
        response = httpx.get(f"{service.http_url}/readyz")
        body = {**response.json(), "status": response.status_code}
        if predicate(body):
            return body
        assert time.monotonic() < deadline, f"/readyz never matched; last: {body}"
        time.sleep(0.05)


@pytest.mark.parametrize("start", [reward_unified, eval_unigenbench], ids=["reward-unified", "eval-unigenbench"])
def test_readyz_and_the_log_name_the_judge_and_its_error(
    judge: FakeVllmHealth, start: Callable[[str], ServiceThread], caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    service = start(f"{judge.root_url}/v1")
    try:
        loading = readyz_when(service, lambda b: "judge_error" in b["waiting_for"])
        assert loading == {
            "ready": False,
            "waiting_for": {"judge_url": judge.root_url, "judge_error": "GET /health answered HTTP 503: model loading"},
            "status": 503,
        }
        assert f"judge at {judge.root_url} is not healthy: GET /health answered HTTP 503: model loading" in caplog.text
        assert f"not ready, waiting for: judge_url={judge.root_url}, judge_error=GET /health" in caplog.text

        judge.status = 200
        assert readyz_when(service, lambda b: b["ready"]) == {"ready": True, "waiting_for": {}, "status": 200}
        assert f"judge at {judge.root_url} is healthy" in caplog.text

        judge.stop()  # connection refused from now on (a poll in flight at the stop may see a ReadError first)
        down = readyz_when(service, lambda b: b["waiting_for"].get("judge_error", "").startswith("ConnectError"))
        assert (down["ready"], down["status"]) == (False, 503)
        assert down["waiting_for"]["judge_url"] == judge.root_url
        assert f"judge at {judge.root_url} is not healthy: ConnectError" in caplog.text
    finally:
        service.stop()
    # Said once per change, not on every health poll.
    assert caplog.text.count("is not healthy: GET /health answered HTTP 503") == 1
