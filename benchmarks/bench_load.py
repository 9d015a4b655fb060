"""Overload: many concurrent clients against one reward-ocr with a deadline (issue 8, finding 2).

300 clients each send one request of 2 samples at once, with a 15 s deadline (HTTP
`x-request-timeout-ms`, gRPC deadline), against the default service (`python -m reward_ocr`, one
worker process per core). Admission by time should answer every request within its deadline: 200
when it can be scored in time, 429 / RESOURCE_EXHAUSTED at once otherwise. Printed per transport:
the share answered within the deadline (target 100%), the status counts, p50/p99 latency of the
admitted requests and of the refusals, samples scored per second, and the server's peak RSS (main
process and OCR workers).

Usage: `make bench-load` (or `python benchmarks/bench_load.py --clients 300 --deadline 15`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from PIL import Image, ImageDraw, ImageFont

from deepgen.reward.v1 import reward_pb2
from deepgen_common.client import wait_ready

CORES = os.cpu_count() or 1
MiB = 1 << 20


def render(i: int) -> bytes:
    image = Image.new("RGB", (512, 512), (250, 248, 240))
    ImageDraw.Draw(image).text((30, 220), f"SIGN {i % 97}", fill="black", font=ImageFont.load_default(size=44))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name):
            return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@dataclass
class Outcome:
    status: str
    seconds: float


@dataclass
class Row:
    name: str
    deadline_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0

    def latencies(self, status: str) -> list[float]:
        return sorted(o.seconds for o in self.outcomes if o.status == status)

    def report(self, samples_per_request: int) -> None:
        counts = Counter(o.status for o in self.outcomes)
        in_time = sum(1 for o in self.outcomes if o.status in ("200", "429") and o.seconds <= self.deadline_s)
        admitted, refused = self.latencies("200"), self.latencies("429")
        print(f"{self.name}:")
        print(f"  answered within the {self.deadline_s:g} s deadline (200 or 429): {in_time}/{len(self.outcomes)}"
              f" = {100 * in_time / len(self.outcomes):.1f}%")  # fmt: skip
        print(f"  statuses: {dict(sorted(counts.items()))}")
        if admitted:
            rate = len(admitted) * samples_per_request / self.wall_s
            print(f"  admitted (200): p50 {pct(admitted, 50):.2f} s, p99 {pct(admitted, 99):.2f} s, "
                  f"max {admitted[-1]:.2f} s; {rate:.2f} samples/s scored")  # fmt: skip
        if refused:
            print(f"  refused (429): p50 {pct(refused, 50) * 1e3:.0f} ms, p99 {pct(refused, 99) * 1e3:.0f} ms")


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


class Service:
    def __init__(self) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "HTTP_PORT": str(self.http_port),
            "GRPC_PORT": str(self.grpc_port),
            "LOG_LEVEL": "WARNING",
        }
        self.proc = subprocess.Popen([sys.executable, "-m", "reward_ocr"], env=env)
        wait_ready(f"http://127.0.0.1:{self.http_port}", timeout_s=300, alive=lambda: self.proc.poll() is None)

    def reset_peaks(self) -> None:
        for pid in [self.proc.pid, *children(self.proc.pid)]:
            Path(f"/proc/{pid}/clear_refs").write_text("5")

    def peaks(self) -> tuple[int, int]:
        """Peak RSS of the main process and the sum of the workers' peaks."""
        return memory(self.proc.pid, "VmHWM"), sum(memory(p, "VmHWM") for p in children(self.proc.pid))

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


async def http_row(service: Service, pngs: list[bytes], clients: int, deadline_s: float) -> Row:
    """Each client opens its own connection and writes one HTTP/1.1 request by hand: an HTTP client
    library's connection pool would add its own queueing to the latencies measured here."""
    row = Row("HTTP", deadline_s)
    samples = [
        {"image": {"data": base64.b64encode(p).decode()}, "prompt": f'"SIGN {i}"'} for i, p in enumerate(pngs[:2])
    ]
    body = json.dumps({"samples": samples}).encode()
    head = (
        f"POST /v1/score HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nx-request-timeout-ms: {int(deadline_s * 1000)}\r\nconnection: close\r\n\r\n"
    ).encode()

    async def one() -> None:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(deadline_s + 5):
                reader, writer = await asyncio.open_connection("127.0.0.1", service.http_port)
                writer.write(head + body)
                status = (await reader.readline()).split()[1].decode()
                await reader.read()  # to the end: the server closes after the answer
                writer.close()
        except (OSError, TimeoutError, IndexError) as exc:
            status = type(exc).__name__
        row.outcomes.append(Outcome(status, time.perf_counter() - start))

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    row.wall_s = time.perf_counter() - start
    return row


async def grpc_row(service: Service, pngs: list[bytes], clients: int, deadline_s: float) -> Row:
    row = Row("gRPC", deadline_s)
    request = reward_pb2.ScoreRequest(
        samples=[reward_pb2.Sample(image={"data": p}, prompt=f'"SIGN {i}"') for i, p in enumerate(pngs[:2])]
    ).SerializeToString()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        score = channel.unary_unary("/deepgen.reward.v1.RewardService/Score")

        async def one() -> None:
            start = time.perf_counter()
            try:
                await score(request, timeout=deadline_s)
                status = "200"
            except grpc.aio.AioRpcError as exc:
                status = "429" if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED else exc.code().name
            row.outcomes.append(Outcome(status, time.perf_counter() - start))

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(clients)))
        row.wall_s = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--deadline", type=float, default=15.0, help="seconds")
    args = parser.parse_args()
    pngs = [render(i) for i in range(2)]
    print(
        f"reward-ocr under {args.clients} concurrent clients x 2 samples, {args.deadline:g} s deadline, {CORES} cores"
    )
    service = Service()
    try:
        asyncio.run(http_row(service, pngs, 2, 60))  # warm-up: connections, and a measured service time
        for make_row in (http_row, grpc_row):
            service.reset_peaks()
            row = asyncio.run(make_row(service, pngs, args.clients, args.deadline))
            row.report(2)
            main_peak, workers_peak = service.peaks()
            print(f"  peak RSS: main process {main_peak / MiB:.0f} MiB, OCR workers {workers_peak / MiB:.0f} MiB")
            time.sleep(3)  # let the queue drain before the next row
    finally:
        service.close()


if __name__ == "__main__":
    main()
