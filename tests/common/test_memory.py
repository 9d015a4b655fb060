"""Bounded memory under many maximum-size bodies (issue 8, finding 3): a real `python -m reward_ocr`
process, its RSS read from /proc. Over HTTP, bodies are read only when the in-flight byte budget has
room, once, and their base64 strings are dropped as the images are decoded. Over gRPC, a call's message
stays on the client (HTTP/2 flow control) until the budget has room for a largest message. The heap a
read took goes back to the OS right after it, and what a large request freed when it ends, so the idle
RSS is that of an idle process."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from deepgen.reward.v1 import reward_pb2
from deepgen_common.client import wait_ready
from tests.helpers import REPO
from tests.reward_ocr.test_lifecycle import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak RSS"),
]

MiB = 1 << 20
LIMIT = 32 * MiB
SCORE = "/deepgen.reward.v1.RewardService/Score"
# Sixteen largest requests peak at about twice the limit above an idle process (measured 1.7–2.6×: a
# body and its parsed strings, or the three copies grpcio makes of a message as it reads it, plus the
# allocator's slack, which varies from run to run); issue 8 measured 1.77 GB for sixteen 59 MiB bodies.
PEAK_BOUND = 3


def rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@dataclass
class Service:
    pid: int
    http_port: int
    grpc_port: int

    def burst(self, send: Callable[[int], str], n: int) -> tuple[int, int]:
        """Peak RSS during n concurrent `send`s and RSS a second after, both above the idle RSS."""
        assert send(0) == "OK"  # first use allocates what every request needs (decoder, buffers)
        time.sleep(1.0)
        idle = rss(self.pid)
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            outcomes = list(pool.map(send, range(n)))
        assert outcomes == ["OK"] * n
        peak = rss(self.pid, "VmHWM") - idle
        time.sleep(1.0)
        return peak, rss(self.pid) - idle


@pytest.fixture
def service() -> Iterator[Service]:
    http_port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "OCR_EXECUTOR": "thread",
        "OCR_WORKERS": "1",
        "HTTP_PORT": str(http_port),
        "GRPC_PORT": str(grpc_port),
        "MAX_REQUEST_BYTES": str(LIMIT),
    }
    proc = subprocess.Popen([sys.executable, "-m", "reward_ocr"], env=env, cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"grpc://127.0.0.1:{grpc_port}", timeout_s=120, alive=lambda: proc.poll() is None)
        yield Service(proc.pid, http_port, grpc_port)
    finally:
        proc.terminate()
        proc.wait(30)


def test_sixteen_concurrent_maximum_size_http_bodies_stay_within_about_twice_the_limit(service: Service):
    # Two 11 MiB images that are not images: each sample answers ERROR quickly, so the memory
    # measured is that of reading and decoding the bodies.
    sample = json.dumps({"image": {"data": base64.b64encode(os.urandom(11 * MiB)).decode()}, "prompt": '"x"'})
    body = f'{{"samples": [{sample}, {sample}]}}'.encode()
    assert LIMIT * 0.85 < len(body) <= LIMIT

    def post(_: int) -> str:
        url = f"http://127.0.0.1:{service.http_port}/v1/score"
        response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=300)
        return "OK" if response.status_code == 200 else str(response.status_code)

    peak, after = service.burst(post, 16)
    assert peak <= PEAK_BOUND * LIMIT, f"peak {peak / MiB:.0f} MiB above idle, limit {LIMIT / MiB:.0f} MiB"
    # Back at idle: each large request's freed heap goes back to the OS when it ends (on main 650 MiB stayed).
    assert after <= LIMIT, f"{after / MiB:.0f} MiB still held after the burst"


def test_sixteen_concurrent_maximum_size_grpc_messages_stay_within_about_twice_the_limit(service: Service):
    # The same two non-images as over HTTP, as protobuf bytes, filling the largest gRPC message
    # (2/3 of MAX_REQUEST_BYTES).
    largest = LIMIT * 2 // 3
    data = os.urandom((largest - 64) // 2)
    body = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(prompt='"x"', image={"data": data})] * 2)
    body = body.SerializeToString()
    assert largest * 0.99 < len(body) <= largest
    options = [("grpc.max_send_message_length", LIMIT)]
    # One connection per caller, as sixteen clients would open (distinct arguments: no shared subchannel).
    channels = [
        grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}", options=[*options, ("test.caller", i)])
        for i in range(16)
    ]

    def call(i: int) -> str:
        try:
            channels[i].unary_unary(SCORE)(body, timeout=300)
        except grpc.RpcError as exc:
            return exc.code().name
        return "OK"

    try:
        peak, after = service.burst(call, 16)
    finally:
        for channel in channels:
            channel.close()
    assert peak <= PEAK_BOUND * LIMIT, f"peak {peak / MiB:.0f} MiB above idle, limit {LIMIT / MiB:.0f} MiB"
    assert after <= LIMIT, f"{after / MiB:.0f} MiB still held after the burst"


def test_a_grpc_message_over_two_thirds_of_the_limit_is_refused(service: Service):
    body = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(prompt='"x"', image={"data": bytes(LIMIT * 2 // 3)})])
    options = [("grpc.max_send_message_length", LIMIT)]
    with (
        grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}", options=options) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        channel.unary_unary(SCORE)(body.SerializeToString(), timeout=60)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
