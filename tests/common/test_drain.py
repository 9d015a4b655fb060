"""Drain on SIGTERM (issue 8, finding 5): a real `python -m reward_ocr` process with requests in flight
on both transports. Readiness turns false at once, new requests get 503 / UNAVAILABLE, in-flight ones
finish or get 503 / UNAVAILABLE (never 500), and the process exits within SHUTDOWN_GRACE_S."""

from __future__ import annotations

import base64
import concurrent.futures
import math
import signal
import time

import grpc
import httpx
import pytest

from deepgen.reward.v1 import reward_pb2
from deepgen_common.client import wait_ready
from tests.helpers import render_text
from tests.reward_ocr.test_lifecycle import free_port, start_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGE = render_text(["DRAIN"])
GRACE_S = 4.0
SCORE = "/deepgen.reward.v1.RewardService/Score"


def test_sigterm_drains_within_the_grace_and_never_answers_500():
    http_port, grpc_port = free_port(), free_port()
    proc = start_process(HTTP_PORT=str(http_port), GRPC_PORT=str(grpc_port), SHUTDOWN_GRACE_S=str(GRACE_S))
    http_url = f"http://127.0.0.1:{http_port}"
    sample = {"image": {"data": base64.b64encode(IMAGE).decode()}, "prompt": '"DRAIN"'}
    try:
        wait_ready(f"grpc://127.0.0.1:{grpc_port}", timeout_s=120, alive=lambda: proc.poll() is None)
        started = time.monotonic()
        assert httpx.post(f"{http_url}/v1/score", json={"samples": [sample] * 2}, timeout=60).status_code == 200
        per_sample = (time.monotonic() - started) / 2
        # Samples per request so that the 6 requests in flight need twice the grace on this machine's OCR
        # (a fixed count was too few on a fast, quiet machine: every request finished in time).
        n = min(64, max(2, math.ceil(2 * (GRACE_S + 1.0) / (6 * per_sample))))
        body = {"samples": [sample] * n}
        message = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image={"data": IMAGE}, prompt='"DRAIN"')] * n)
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        score = channel.unary_unary(SCORE)

        def over_http() -> str:
            return str(httpx.post(f"{http_url}/v1/score", json=body, timeout=60).status_code)

        def over_grpc() -> str:
            try:
                score(message.SerializeToString(), timeout=60)
                return "OK"
            except grpc.RpcError as exc:
                return exc.code().name

        # 6·n samples in flight on one OCR thread: more than the grace lets finish.
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            in_flight = [pool.submit(over_http) for _ in range(3)] + [pool.submit(over_grpc) for _ in range(3)]
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            time.sleep(0.3)
            assert httpx.get(f"{http_url}/readyz").status_code == 503
            late = httpx.post(f"{http_url}/v1/score", json=body, timeout=10)
            assert late.status_code == 503
            assert late.json()["error"]["code"] == "UNAVAILABLE"
            assert over_grpc() == "UNAVAILABLE"
            answers = [f.result(timeout=60) for f in in_flight]
        proc.wait(timeout=30)
        exited_after = time.monotonic() - signalled
        channel.close()
        assert set(answers) <= {"200", "503", "OK", "UNAVAILABLE"}, answers
        assert {"200", "OK"} & set(answers), answers  # the first requests finished
        assert {"503", "UNAVAILABLE"} & set(answers), answers  # the grace ran out on the last ones
        assert proc.returncode == 0
        assert exited_after < GRACE_S + 2.0, f"exited {exited_after:.1f} s after SIGTERM, grace {GRACE_S:g} s"
    finally:
        proc.kill()
