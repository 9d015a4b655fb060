"""OCR reward throughput: the bare engine against the service, all measured in one run.

Rows (images/s, request latency p50/p99):
- bare RapidOCR in this process: one core; all cores as N threads x 1 intra-op thread, as one
  engine with N intra-op threads, and as N worker processes x 1 thread (the best is the baseline);
- the default service (`python -m reward_ocr`) over gRPC and over HTTP with 1, 4 and 16 concurrent
  clients sending one image per request, and one client sending batches of 16 and of 32 (the
  trainer's pattern: one request per generation micro-batch, 32 images by default);
- the reference stack's pattern: one process scoring one image at a time;
- the service with 1 and with N worker processes (scaling in cores).

Usage: `make bench-ocr` (or `python benchmarks/bench_ocr.py --images 48`).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deepgen_common.client import RewardClient, wait_ready
from deepgen_common.types import Sample
from reward_ocr.engines import RapidOcrEngine

CORES = os.cpu_count() or 1
WORDS = [
    "GRAND OPENING",
    "FRESH BREAD",
    "SALE 50% OFF",
    "DEEPGEN 1.0",
    "NO PARKING",
    "OPEN 24 HOURS",
    "HAPPY BIRTHDAY",
    "CAFE DU MONDE",
]


def render(i: int) -> bytes:
    """A 512x512 PNG with one line of text, like a rendered-text RL sample."""
    image = Image.new("RGB", (512, 512), (250, 248, 240))
    ImageDraw.Draw(image).text(
        (30, 200 + (i % 5) * 20), WORDS[i % len(WORDS)], fill="black", font=ImageFont.load_default(size=40 + i % 8)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Row:
    name: str
    images: int
    seconds: float
    latencies: list[float]

    @property
    def throughput(self) -> float:
        return self.images / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def timed(name: str, images: int, work: Callable[[list[float]], None]) -> Row:
    latencies: list[float] = []
    start = time.perf_counter()
    work(latencies)
    row = Row(name, images, time.perf_counter() - start, latencies)
    print(f"  {name:<52} {row.throughput:6.2f} img/s", flush=True)
    return row


# --- bare engine --------------------------------------------------------------------------------------


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


_engine: RapidOcrEngine | None = None


def _init(threads: int) -> None:
    global _engine
    import cv2

    cv2.setNumThreads(1)
    _engine = RapidOcrEngine(threads)
    _engine.read(pixels(render(0)))


def _read(png: bytes) -> float:
    start = time.perf_counter()
    assert _engine is not None
    _engine.read(pixels(png))
    return time.perf_counter() - start


def bare_sequential(name: str, pngs: list[bytes], threads: int) -> Row:
    _init(threads)
    return timed(name, len(pngs), lambda lat: lat.extend(_read(p) for p in pngs))


def bare_threads(pngs: list[bytes]) -> Row:
    local = threading.local()

    def read(png: bytes) -> float:
        if not hasattr(local, "engine"):
            local.engine = RapidOcrEngine(1)
        start = time.perf_counter()
        local.engine.read(pixels(png))
        return time.perf_counter() - start

    with ThreadPoolExecutor(CORES) as pool:
        list(pool.map(read, pngs[:CORES] * 2))  # create and warm one engine per thread
        return timed(
            f"bare engine, {CORES} threads x 1 intra-op thread", len(pngs), lambda lat: lat.extend(pool.map(read, pngs))
        )


def bare_processes(pngs: list[bytes]) -> Row:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(CORES, mp_context=ctx, initializer=_init, initargs=(1,)) as pool:
        list(pool.map(_read, pngs[:CORES] * 2))
        return timed(
            f"bare engine, {CORES} processes x 1 thread", len(pngs), lambda lat: lat.extend(pool.map(_read, pngs))
        )


# --- service ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, **env: str) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        full = {
            **os.environ,
            "HOST": "127.0.0.1",
            "HTTP_PORT": str(self.http_port),
            "GRPC_PORT": str(self.grpc_port),
            "LOG_LEVEL": "WARNING",
            "MAX_QUEUED_SAMPLES": "4096",
            **env,
        }
        self.proc = subprocess.Popen([sys.executable, "-m", "reward_ocr"], env=full)
        wait_ready(f"http://127.0.0.1:{self.http_port}", alive=lambda: self.proc.poll() is None)

    def url(self, transport: str) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}" if transport == "grpc" else f"http://127.0.0.1:{self.http_port}"

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def load(name: str, url: str, pngs: list[bytes], clients: int, batch: int = 1) -> Row:
    samples = [Sample(p, f'a sign that says "{WORDS[i % len(WORDS)]}"') for i, p in enumerate(pngs)]
    requests = [samples[i : i + batch] for i in range(0, len(samples), batch)]
    per_client = [requests[c::clients] for c in range(clients)]
    connections = [RewardClient(url) for _ in range(clients)]
    for c in connections:
        c.score(samples[:1])  # connect and fetch limits outside the timed part

    def client(index: int, latencies: list[float]) -> None:
        for request in per_client[index]:
            start = time.perf_counter()
            results = connections[index].score(request)
            latencies.append(time.perf_counter() - start)
            assert all(r.outcome.value == "OK" for r in results), results

    def work(latencies: list[float]) -> None:
        threads = [threading.Thread(target=client, args=(i, latencies)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    try:
        return timed(name, len(samples), work)
    finally:
        for c in connections:
            c.close()


def whole_batches(pngs: list[bytes], batch: int) -> list[bytes]:
    """The images repeated up to a whole number of batches, at least two, so no request is partial."""
    n = max(2, -(-len(pngs) // batch)) * batch
    return (pngs * -(-n // len(pngs)))[:n]


def overhead(name: str, url: str, png: bytes, requests: int = 200) -> Row:
    """Round trips of one sample whose prompt quotes no text: no OCR runs, so this is the cost of
    the transport, validation and queueing alone."""
    sample = [Sample(png, "a lighthouse at dawn")]
    with RewardClient(url) as client:
        client.score(sample)

        def work(latencies: list[float]) -> None:
            for _ in range(requests):
                start = time.perf_counter()
                client.score(sample)
                latencies.append(time.perf_counter() - start)

        return timed(name, requests, work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="images per measurement")
    args = parser.parse_args()
    pngs = [render(i) for i in range(args.images)]
    print(f"reward-ocr benchmark: {args.images} images of 512x512 per row, {CORES} cores\n")

    print("bare RapidOCR engine (in process):")
    one_core = bare_sequential("bare engine, 1 process x 1 thread (one core)", pngs, 1)
    intra = bare_sequential(f"bare engine, 1 process x {CORES} intra-op threads", pngs, CORES)
    threads = bare_threads(pngs)
    processes = bare_processes(pngs)
    best = max((intra, threads, processes), key=lambda r: r.throughput)

    print("\nreference pattern (one process, one image at a time):")
    ref_service = Service(OCR_EXECUTOR="thread", OCR_WORKERS="1")
    try:
        reference = load("service, 1 worker, 16 gRPC clients", ref_service.url("grpc"), pngs, 16)
    finally:
        ref_service.close()

    print(f"\nservice, default settings ({CORES} worker processes x 1 thread):")
    service = Service()
    rows: list[Row] = []
    try:
        for transport in ("grpc", "http"):
            for clients in (1, 4, 16):
                rows.append(
                    load(
                        f"service {transport}, {clients} clients x 1 image/request",
                        service.url(transport),
                        pngs,
                        clients,
                    )
                )
            for batch in (16, 32):
                rows.append(
                    load(
                        f"service {transport}, 1 client x {batch} images/request",
                        service.url(transport),
                        whole_batches(pngs, batch),
                        1,
                        batch=batch,
                    )
                )
        overheads = [overhead(f"round trip without OCR, {t}", service.url(t), pngs[0]) for t in ("grpc", "http")]
    finally:
        service.close()

    print("\nscaling in cores (16 gRPC clients):")
    single = Service(OCR_WORKERS="1")
    try:
        one_worker = load("service, 1 worker process", single.url("grpc"), pngs, 16)
    finally:
        single.close()
    all_workers = next(r for r in rows if r.name == "service grpc, 16 clients x 1 image/request")

    print(f"\n{'row':<52} {'img/s':>7} {'vs best bare':>13} {'vs reference':>13} {'p50 ms':>8} {'p99 ms':>8}")
    for row in [one_core, intra, threads, processes, reference, *rows, one_worker]:
        print(
            f"{row.name:<52} {row.throughput:7.2f} {row.throughput / best.throughput:12.0%} "
            f"{row.throughput / reference.throughput:12.2f}x {row.percentile(50) * 1e3:8.0f} "
            f"{row.percentile(99) * 1e3:8.0f}"
        )
    best_service = max(rows, key=lambda r: r.throughput)
    for row in rows:
        if row.name.endswith("1 client x 32 images/request"):
            share = row.throughput / best.throughput
            print(f"{row.name} (the trainer's pattern): {share:.0%} of best bare (target >= 90%)")
    print(
        f"\nbest bare all-core: {best.name} = {best.throughput:.2f} img/s "
        f"({best.throughput / one_core.throughput:.2f}x one core)"
    )
    print(
        f"best service: {best_service.name} = {best_service.throughput:.2f} img/s = "
        f"{best_service.throughput / best.throughput:.0%} of best bare (target >= 90%), "
        f"{best_service.throughput / reference.throughput:.2f}x the reference pattern"
    )
    print(
        f"service scaling 1 -> {CORES} worker processes: {all_workers.throughput / one_worker.throughput:.2f}x "
        f"(ideal {CORES}x)"
    )
    print(f"median per-image latency of the bare engine: {statistics.median(one_core.latencies) * 1e3:.0f} ms")
    for row in overheads:
        print(f"{row.name}: p50 {row.percentile(50) * 1e3:.2f} ms, p99 {row.percentile(99) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
