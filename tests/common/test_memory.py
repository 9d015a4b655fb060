"""Bounded memory under many maximum-size bodies (issue 8, finding 3): a real `python -m reward_ocr`
process, its RSS read from /proc. Bodies are read only when the in-flight byte budget has room, once,
and their base64 strings are dropped as the images are decoded."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deepgen_common.client import wait_ready
from tests.helpers import REPO
from tests.reward_ocr.test_lifecycle import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1 << 20
LIMIT = 32 * MiB


def rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak RSS")
def test_sixteen_concurrent_maximum_size_bodies_stay_within_twice_the_limit():
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
        # Two 11 MiB images that are not images: each sample answers ERROR quickly, so the memory
        # measured is that of reading and decoding the bodies.
        sample = json.dumps({"image": {"data": base64.b64encode(os.urandom(11 * MiB)).decode()}, "prompt": '"x"'})
        body = f'{{"samples": [{sample}, {sample}]}}'.encode()
        assert LIMIT * 0.85 < len(body) <= LIMIT

        def post(_: int) -> int:
            url = f"http://127.0.0.1:{http_port}/v1/score"
            return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=300).status_code

        assert post(0) == 200  # first use allocates what every request needs (decoder, buffers)
        time.sleep(1.0)
        idle = rss(proc.pid)
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(post, range(16)))
        assert statuses == [200] * 16
        peak = rss(proc.pid, "VmHWM") - idle
        time.sleep(1.0)
        after = rss(proc.pid) - idle
        assert peak <= 2.5 * LIMIT, f"peak {peak / MiB:.0f} MiB above idle, limit {LIMIT / MiB:.0f} MiB"
        # Back near idle: what stays is allocator slack, well under one request body.
        assert after <= 0.5 * LIMIT, f"{after / MiB:.0f} MiB still held after the burst"
    finally:
        proc.terminate()
        proc.wait(30)
