"""reward-ocr's life cycle: readiness while loading, back-pressure, the real process and SIGTERM."""

from __future__ import annotations

import base64
import concurrent.futures
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deepgen.reward.v1 import reward_pb2
from deepgen_common.client import RewardClient, wait_ready
from deepgen_common.reward_api import reward_component
from deepgen_common.types import Sample
from reward_ocr.backend import OcrBackend
from tests.common.test_overload import metric
from tests.conftest import ocr_settings
from tests.helpers import REPO, ServiceThread, render_text

pytestmark = pytest.mark.integration

IMAGE = render_text(["QUEUE"])


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_not_serving_until_the_engine_is_loaded():
    # Worker processes take seconds to spawn and load their models: long enough to look before.
    service = ServiceThread(ocr_settings(ocr_workers=1), reward_component(OcrBackend)).start(wait_ready=False)
    try:
        assert health(service.grpc_port) == health_pb2.HealthCheckResponse.NOT_SERVING
        loading = httpx.get(f"{service.http_url}/readyz")
        assert loading.status_code == 503
        assert loading.json() == {"ready": False, "waiting_for": {"ocr_workers": "starting 1 rapidocr workers"}}
        assert httpx.get(f"{service.http_url}/healthz").status_code == 200  # alive while loading
        with RewardClient(service.http_url) as c:
            assert c.info().name == "reward-ocr"  # info is served while loading
        response = httpx.post(f"{service.http_url}/v1/score", json={"samples": [{"image": {"data": "eA=="}}]})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "UNAVAILABLE"
        service.wait_ready()
        time.sleep(1.0)  # readiness is published on the next poll
        assert health(service.grpc_port) == health_pb2.HealthCheckResponse.SERVING
        ready = httpx.get(f"{service.http_url}/readyz")
        assert (ready.status_code, ready.json()) == (200, {"ready": True, "waiting_for": {}})
    finally:
        service.stop()


def test_full_queue_answers_resource_exhausted_and_429():
    settings = ocr_settings(ocr_executor="thread", ocr_workers=1, max_batch_size=4, max_queued_samples=4)
    service = ServiceThread(settings, reward_component(OcrBackend)).start()
    busy = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image={"data": IMAGE}, prompt='"QUEUE"')] * 4)
    one = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image={"data": IMAGE}, prompt='"QUEUE"')])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
            score = ch.unary_unary("/deepgen.reward.v1.RewardService/Score")
            first = score.future(busy.SerializeToString(), timeout=60)  # fills the queue until its 4 are read
            admitted = time.monotonic() + 30
            while service.running.service.admission.pending < 4:  # counted until the whole request is answered
                assert time.monotonic() < admitted, "the busy request was never admitted"
                time.sleep(0.005)
            with pytest.raises(grpc.RpcError) as info:
                score(one.SerializeToString(), timeout=60)
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full: 4 samples pending" in info.value.details()
            response = httpx.post(
                f"{service.http_url}/v1/score", json={"samples": [{"image": {"data": "eA=="}, "prompt": '"x"'}]}
            )
            assert response.status_code == 429
            assert response.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
            assert len(reward_pb2.ScoreResponse.FromString(first.result()).results) == 4
            score(one.SerializeToString(), timeout=60)  # drained: admitted again
    finally:
        service.stop()


@pytest.mark.skipif(importlib.util.find_spec("paddleocr") is not None, reason="paddleocr would load")
def test_readiness_admission_info_and_metrics_count_only_live_workers():
    # Worker processes killed as the OOM killer would, whose replacements cannot load their engine:
    # the pool is switched to an engine whose package is missing here (as in tests/reward_ocr/test_pool.py).
    service = ServiceThread(ocr_settings(ocr_workers=2), reward_component(OcrBackend)).start()
    pool = service.running.service.backend.pool
    working = pool.config
    sample = {"image": {"data": base64.b64encode(IMAGE).decode()}, "prompt": '"QUEUE"'}

    def score(n: int) -> httpx.Response:
        return httpx.post(f"{service.http_url}/v1/score", json={"samples": [sample] * n}, timeout=60)

    def wait_until(condition) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)

    def described() -> str:
        with RewardClient(service.grpc_url) as c:
            return c.info().backend

    try:
        assert described() == "rapidocr (2 process workers x 1 threads)"
        assert metric(service, "deepgen_workers_live") == 2
        pool.config = replace(working, engine="paddleocr")
        pool.restart_delay_s, pool.max_restart_delay_s = 0.1, 0.5

        os.kill(pool._running[0].process.pid, signal.SIGKILL)
        outcomes = sorted(r["outcome"] for r in score(2).json()["results"])  # one sample on each worker
        assert outcomes == ["ERROR", "OK"]
        wait_until(lambda: pool.live == 1)
        assert score(1).json()["results"][0]["outcome"] == "OK"  # the live worker serves
        assert httpx.get(f"{service.http_url}/readyz").status_code == 200
        assert service.running.service.admission.workers == 1
        assert metric(service, "deepgen_workers_live") == 1
        assert described() == "rapidocr (1 of 2 live process workers x 1 threads)"

        [worker] = pool._running.values()
        os.kill(worker.process.pid, signal.SIGKILL)
        assert score(1).json()["results"][0]["outcome"] == "ERROR"
        wait_until(lambda: pool.live == 0)
        time.sleep(1.0)  # readiness is published on the next poll
        assert health(service.grpc_port) == health_pb2.HealthCheckResponse.NOT_SERVING
        readyz = httpx.get(f"{service.http_url}/readyz")
        assert readyz.status_code == 503
        assert "no worker is live: all 2 fail to start (WorkerDied" in readyz.json()["waiting_for"]["ocr_workers"]
        refused = score(1)
        assert refused.status_code == 503  # clients retry UNAVAILABLE on another replica
        assert "No module named 'paddleocr'" in refused.json()["error"]["message"]
        assert metric(service, "deepgen_workers_live") == 0
        assert described() == "rapidocr (0 of 2 live process workers x 1 threads)"

        pool.config = working  # the engine loads again: the workers come back, and readiness with them
        wait_until(lambda: pool.live == 2)
        time.sleep(1.0)
        assert health(service.grpc_port) == health_pb2.HealthCheckResponse.SERVING
        assert [r["outcome"] for r in score(2).json()["results"]] == ["OK", "OK"]
        assert metric(service, "deepgen_workers_live") == 2
    finally:
        service.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(**env: str) -> subprocess.Popen[str]:
    full_env = {**os.environ, "HOST": "127.0.0.1", "OCR_EXECUTOR": "thread", "OCR_WORKERS": "1", **env}
    return subprocess.Popen(
        [sys.executable, "-m", "reward_ocr"],
        env=full_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_process_drains_in_flight_requests_on_sigterm():
    http_port, grpc_port = free_port(), free_port()
    proc = start_process(HTTP_PORT=str(http_port), GRPC_PORT=str(grpc_port), SHUTDOWN_GRACE_S="30")
    try:
        wait_ready(f"grpc://127.0.0.1:{grpc_port}", timeout_s=60, alive=lambda: proc.poll() is None)
        with RewardClient(f"grpc://127.0.0.1:{grpc_port}") as client, concurrent.futures.ThreadPoolExecutor() as pool:
            client.info()
            in_flight = pool.submit(client.score, [Sample(IMAGE, '"QUEUE"')] * 8)  # ~2 s of OCR on one thread
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            results = in_flight.result(timeout=60)
        assert [r.outcome.value for r in results] == ["OK"] * 8
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
        messages = [entry["msg"] for entry in logs]
        assert "shutting down" in messages
        assert messages[-1] == "stopped"
    finally:
        proc.kill()


def test_process_rejects_bad_settings_clearly():
    proc = start_process(OCR_BACKEND="tesseract", HTTP_PORT="0", GRPC_PORT="0")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "invalid settings: OCR_BACKEND: Input should be 'rapidocr' or 'paddleocr'" in stderr
    assert "Traceback" not in stderr
