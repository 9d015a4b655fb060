"""reward-unified adapter overhead over direct vLLM calls, on a real vLLM server (CPU, tiny model).

Rows, all in one run against the same vLLM server (answers forced to a short verdict with
`structured_outputs`, so the judge's own time is small and the adapter's cost shows):
- latency of one pairwise judgement: a direct chat completion vs. the adapter scoring a group of 2
  (one judge call) over gRPC and HTTP; the difference is what the adapter adds;
- throughput with 1 and 32 concurrent groups of 8 (28 judge calls each): direct calls vs. the adapter;
- judge calls per default training step (256 images in groups of 8), with and without both orders.

Needs `make setup-judges`. Usage: `make bench-judges`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from deepgen_common.client import RewardClient, wait_ready
from deepgen_common.types import Mode, Sample
from reward_unified.templates import Templates, fill
from reward_unified.verdicts import comparisons

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.judges.vllm_server import VllmServer, free_port  # noqa: E402 - the test harness starts vLLM

TEMPLATES = REPO / "tests" / "fixtures" / "judge_data" / "templates"  # the project's templates, upstream format
FORCED = {"structured_outputs": {"regex": re.escape("<answer>Image 1 is better</answer>")}}
PROMPT = "a lighthouse on a cliff at dawn"


def images(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.new("RGB", (512, 512), (40 * i % 256, 90 + 20 * i % 160, 200 - 15 * i % 200)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def chat_body(pair: list[bytes], text: str) -> dict:
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(p).decode()}}
        for p in pair
    ]
    return {
        "model": "UnifiedReward",
        "temperature": 0.0,
        "max_tokens": 64,
        **FORCED,
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
    }


async def direct_calls(base_url: str, bodies: list[dict], concurrency: int) -> list[float]:
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=300) as http:

        async def one(body: dict) -> None:
            async with slots:
                start = time.perf_counter()
                response = await http.post(f"{base_url}/chat/completions", json=body)
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(one(b) for b in bodies))
    return latencies


def adapter_groups(url: str, groups: list[list[Sample]]) -> list[float]:
    latencies: list[float] = []
    clients = [RewardClient(url) for _ in groups]
    for c in clients:
        c.info()

    def run(client: RewardClient, group: list[Sample]) -> None:
        start = time.perf_counter()
        results = client.score(group, Mode.GROUP)
        latencies.append(time.perf_counter() - start)
        assert all(r.outcome.value == "OK" for r in results), results

    threads = [threading.Thread(target=run, args=(c, g)) for c, g in zip(clients, groups, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    return latencies


def main() -> None:
    pngs = images(8)
    pairwise = Templates.load(TEMPLATES).pairwise
    text = fill(pairwise, PROMPT)
    vllm = VllmServer(["UnifiedReward"]).start()
    http_port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "HTTP_PORT": str(http_port),
        "GRPC_PORT": str(grpc_port),
        "JUDGE_URL": vllm.base_url,
        "TEMPLATES_DIR": str(TEMPLATES),
        "JUDGE_EXTRA_BODY": json.dumps(FORCED),
        "JUDGE_MAX_TOKENS": "64",
        "UNIFIEDREWARD_THINK_WORKERS": "32",
        "LOG_LEVEL": "WARNING",
        "MAX_QUEUED_SAMPLES": "4096",
        "MAX_BATCH_SIZE": "64",
    }
    adapter = subprocess.Popen([sys.executable, "-m", "reward_unified"], env=env)
    try:
        wait_ready(f"http://127.0.0.1:{http_port}", alive=lambda: adapter.poll() is None)
        urls = {"grpc": f"grpc://127.0.0.1:{grpc_port}", "http": f"http://127.0.0.1:{http_port}"}
        print(f"vLLM (tiny Qwen2-VL, CPU) at {vllm.base_url}; reward-unified at {urls['grpc']}\n")

        pair = [Sample(p, PROMPT, group_id="g") for p in pngs[:2]]
        asyncio.run(direct_calls(vllm.base_url, [chat_body(pngs[:2], text)] * 3, 1))  # warm up
        direct = asyncio.run(direct_calls(vllm.base_url, [chat_body(pngs[:2], text)] * 30, 1))
        latency = {"direct": direct}
        for name, url in urls.items():
            with RewardClient(url) as client:
                client.score(pair, Mode.GROUP)
                samples = []
                for _ in range(30):
                    start = time.perf_counter()
                    client.score(pair, Mode.GROUP)
                    samples.append(time.perf_counter() - start)
            latency[f"adapter {name}"] = samples
        base = statistics.median(direct)
        print("one pairwise judgement (30 sequential requests)")
        for name, samples in latency.items():
            p50 = statistics.median(samples)
            print(f"  {name:<16} p50 {p50 * 1e3:7.1f} ms   added {(p50 - base) * 1e3:+6.1f} ms")

        print("\ngroups of 8 (28 judge calls each), all at once")
        for n_groups in (1, 32):
            bodies = [
                chat_body([pngs[i], pngs[j]], text)
                for _ in range(n_groups)
                for i, j in itertools.combinations(range(8), 2)
            ]
            start = time.perf_counter()
            asyncio.run(direct_calls(vllm.base_url, bodies, 32))
            direct_s = time.perf_counter() - start
            groups = [[Sample(p, PROMPT, group_id=f"g{k}") for p in pngs] for k in range(n_groups)]
            start = time.perf_counter()
            adapter_groups(urls["grpc"], groups)
            adapter_s = time.perf_counter() - start
            calls = 28 * n_groups
            print(
                f"  {n_groups:>2} groups: direct {calls / direct_s:6.1f} calls/s, adapter {calls / adapter_s:6.1f} "
                f"calls/s ({n_groups / adapter_s:5.2f} groups/s) = {direct_s / adapter_s:.0%} of direct"
            )

        groups_of_8 = [list(range(k, k + 8)) for k in range(0, 256, 8)]
        once = len(comparisons(groups_of_8, both_orders=False))
        twice = len(comparisons(groups_of_8, both_orders=True))
        print(f"\njudge calls per default step (256 images, groups of 8): {once}; with both orders: {twice}")
    finally:
        adapter.send_signal(signal.SIGTERM)
        adapter.wait(30)
        vllm.stop()


if __name__ == "__main__":
    main()
