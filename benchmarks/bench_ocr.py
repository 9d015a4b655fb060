"""OCR reward throughput: the bare engine against the service, all measured in one run.

Rows (images/s, request latency p50/p99):
- bare RapidOCR in this process: one core; all cores as N threads x 1 intra-op thread, as one
  engine with N intra-op threads, and as N worker processes x 1 thread (the best is the baseline);
- the default service (`python -m reward_ocr`) over gRPC and over HTTP with 1, 4 and 16 concurrent
  clients sending one image per request, and one client sending batches of 16 and of 32 (the
  trainer's pattern: one request per generation micro-batch, 32 images by default);
- the reference stack's pattern: one process scoring one image at a time;
- the service with 1 and with N worker processes (scaling in cores).

The headline ratios (service / best bare engine) come from interleaved rounds: each round measures the
three all-core bare layouts and the service's main rows back to back, in a rotated order, so background
load and clock changes hit both sides alike; a round's ratio is against that round's best bare layout,
and the verdict rests on the median over the rounds, printed with its spread (min-max). Other rows are
measured once. Every round is printed as it ends.

Usage: `make bench-ocr` (or `python benchmarks/bench_ocr.py --images 48 --rounds 5`).
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
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deepgen_common.client import RewardClient, wait_ready
from deepgen_common.types import Sample
from reward_ocr.engines import RapidOcrEngine

CORES = os.cpu_count() or 1
T = TypeVar("T")
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


def timed(name: str, images: int, work: Callable[[list[float]], None], echo: bool = True) -> Row:
    latencies: list[float] = []
    start = time.perf_counter()
    work(latencies)
    row = Row(name, images, time.perf_counter() - start, latencies)
    if echo:
        print(f"  {name:<52} {row.throughput:6.2f} img/s", flush=True)
    return row


class Layout(Protocol):
    """One configuration that can be measured again and again (its engines, pools or service stay up)."""

    name: str

    def measure(self, echo: bool = True) -> Row: ...


# --- interleaved rounds -------------------------------------------------------------------------------


def rotated(items: Sequence[T], shift: int) -> list[T]:
    """`items` starting at position `shift` (mod len), wrapping around."""
    k = shift % len(items)
    return [*items[k:], *items[:k]]


@dataclass
class Rounds:
    """Rows of every layout in every round (rows[name][r]); `bare` names the baseline layouts."""

    bare: list[str]
    rows: dict[str, list[Row]]

    def best_bare(self, r: int) -> Row:
        return max((self.rows[name][r] for name in self.bare), key=lambda row: row.throughput)

    def ratios(self, name: str) -> list[float]:
        """`name`'s throughput over the best bare layout of the same round, per round."""
        return [row.throughput / self.best_bare(r).throughput for r, row in enumerate(self.rows[name])]

    def median_rate(self, name: str) -> float:
        return statistics.median(row.throughput for row in self.rows[name])

    def latencies(self, name: str) -> list[float]:
        return [lat for row in self.rows[name] for lat in row.latencies]


def run_rounds(bare: Sequence[Layout], others: Sequence[Layout], rounds: int) -> Rounds:
    """Measure every layout once per round, the order rotated each round so that no layout always
    runs first or after the same neighbour; prints one line per round."""
    layouts = [*bare, *others]
    result = Rounds([b.name for b in bare], {layout.name: [] for layout in layouts})
    for r in range(rounds):
        for layout in rotated(layouts, r):
            result.rows[layout.name].append(layout.measure(echo=False))
        best = result.best_bare(r)
        shares = ", ".join(f"{o.name.removeprefix('service ')} {result.ratios(o.name)[r]:.0%}" for o in others)
        print(f"  round {r + 1}/{rounds}: best bare {best.throughput:.2f} img/s ({best.name}); {shares}", flush=True)
    return result


def spread(values: Sequence[float]) -> str:
    """The median of ratios with their min-max spread, e.g. `93% (88-97%, 5 rounds)`."""
    return f"{statistics.median(values):.0%} ({min(values):.0%}-{max(values):.0%}, {len(values)} rounds)"


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


class InProcess:
    """One engine in this process with `threads` intra-op threads, reading the images one by one."""

    def __init__(self, name: str, pngs: list[bytes], threads: int) -> None:
        import cv2

        cv2.setNumThreads(1)
        self.name, self.pngs = name, pngs
        self.engine = RapidOcrEngine(threads)
        self.engine.read(pixels(pngs[0]))

    def _read(self, png: bytes) -> float:
        start = time.perf_counter()
        self.engine.read(pixels(png))
        return time.perf_counter() - start

    def measure(self, echo: bool = True) -> Row:
        return timed(self.name, len(self.pngs), lambda lat: lat.extend(self._read(p) for p in self.pngs), echo)


class Threads:
    """CORES threads of this process, each with its own 1-thread engine."""

    def __init__(self, pngs: list[bytes]) -> None:
        self.name, self.pngs = f"bare engine, {CORES} threads x 1 intra-op thread", pngs
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(CORES)
        list(self.pool.map(self._read, pngs[:CORES] * 2))  # create and warm one engine per thread

    def _read(self, png: bytes) -> float:
        if not hasattr(self.local, "engine"):
            self.local.engine = RapidOcrEngine(1)
        start = time.perf_counter()
        self.local.engine.read(pixels(png))
        return time.perf_counter() - start

    def measure(self, echo: bool = True) -> Row:
        return timed(self.name, len(self.pngs), lambda lat: lat.extend(self.pool.map(self._read, self.pngs)), echo)

    def close(self) -> None:
        self.pool.shutdown()


class Processes:
    """CORES worker processes with a 1-thread engine each: the service's own layout, without the service."""

    def __init__(self, pngs: list[bytes]) -> None:
        self.name, self.pngs = f"bare engine, {CORES} processes x 1 thread", pngs
        ctx = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(CORES, mp_context=ctx, initializer=_init, initargs=(1,))
        list(self.pool.map(_read, pngs[:CORES] * 2))

    def measure(self, echo: bool = True) -> Row:
        return timed(self.name, len(self.pngs), lambda lat: lat.extend(self.pool.map(_read, self.pngs)), echo)

    def close(self) -> None:
        self.pool.shutdown()


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


def load(name: str, url: str, pngs: list[bytes], clients: int, batch: int = 1, echo: bool = True) -> Row:
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
        return timed(name, len(samples), work, echo)
    finally:
        for c in connections:
            c.close()


def whole_batches(pngs: list[bytes], batch: int) -> list[bytes]:
    """The images repeated up to a whole number of batches, at least two, so no request is partial."""
    n = max(2, -(-len(pngs) // batch)) * batch
    return (pngs * -(-n // len(pngs)))[:n]


@dataclass
class ServiceLoad:
    """`clients` concurrent clients of one service sending `batch` images per request."""

    service: Service
    transport: str
    pngs: list[bytes]
    clients: int
    batch: int = 1

    @property
    def name(self) -> str:
        per_request = "1 image/request" if self.batch == 1 else f"{self.batch} images/request"
        return f"service {self.transport}, {self.clients} client{'s' * (self.clients > 1)} x {per_request}"

    def measure(self, echo: bool = True) -> Row:
        pngs = self.pngs if self.batch == 1 else whole_batches(self.pngs, self.batch)
        return load(self.name, self.service.url(self.transport), pngs, self.clients, self.batch, echo)


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


TRAINER_PATTERN = "1 client x 32 images/request"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="images per measurement (default: 48)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the headline rows (default: 5)")
    args = parser.parse_args()
    if args.images < 1 or args.rounds < 1:
        parser.error("--images and --rounds must be >= 1")
    pngs = [render(i) for i in range(args.images)]
    print(f"reward-ocr benchmark: {args.images} images of 512x512 per row, {CORES} cores\n")

    print("bare RapidOCR engine, one core (in process):")
    one_core = InProcess("bare engine, 1 process x 1 thread (one core)", pngs, 1).measure()

    print("\nreference pattern (one process, one image at a time):")
    ref_service = Service(OCR_EXECUTOR="thread", OCR_WORKERS="1")
    try:
        reference = load("service, 1 worker, 16 gRPC clients", ref_service.url("grpc"), pngs, 16)
    finally:
        ref_service.close()

    with ExitStack() as stack:
        bare: list[Layout] = [InProcess(f"bare engine, 1 process x {CORES} intra-op threads", pngs, CORES)]
        bare.append(stack.enter_context(closing(Threads(pngs))))
        bare.append(stack.enter_context(closing(Processes(pngs))))
        service = Service()
        stack.callback(service.close)
        headline = [ServiceLoad(service, t, pngs, *shape) for t in ("grpc", "http") for shape in ((16, 1), (1, 32))]
        print(
            f"\ninterleaved rounds: the all-core bare engine and the default service ({CORES} worker processes x "
            "1 thread), each round in a rotated order; share = service / the round's best bare:"
        )
        rounds = run_rounds(bare, headline, args.rounds)

        print("\nservice, default settings, measured once:")
        once = [
            ServiceLoad(service, t, pngs, *shape).measure()
            for t in ("grpc", "http")
            for shape in ((1, 1), (4, 1), (1, 16))
        ]
        overheads = [overhead(f"round trip without OCR, {t}", service.url(t), pngs[0]) for t in ("grpc", "http")]

    print("\nscaling in cores (16 gRPC clients):")
    single = Service(OCR_WORKERS="1")
    try:
        one_worker = load("service, 1 worker process", single.url("grpc"), pngs, 16)
    finally:
        single.close()

    best_bare = statistics.median(rounds.best_bare(r).throughput for r in range(args.rounds))
    print(
        f"\n{'row':<52} {'img/s':>7} {'vs best bare (median, min-max)':>31} {'vs reference':>13} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    )

    def line(name: str, rate: float, share: str, latencies: list[float]) -> None:
        p50, p99 = (float(np.percentile(latencies, q)) * 1e3 if latencies else float("nan") for q in (50, 99))
        print(f"{name:<52} {rate:7.2f} {share:>31} {rate / reference.throughput:12.2f}x {p50:8.0f} {p99:8.0f}")

    for row in (one_core, reference):
        line(row.name, row.throughput, f"{row.throughput / best_bare:.0%} (once)", row.latencies)
    for name in [*rounds.bare, *(h.name for h in headline)]:
        line(name, rounds.median_rate(name), spread(rounds.ratios(name)), rounds.latencies(name))
    for row in (*once, one_worker):
        line(row.name, row.throughput, f"{row.throughput / best_bare:.0%} (once)", row.latencies)

    print(
        f"\nbest bare all-core per round (median): {best_bare:.2f} img/s "
        f"({best_bare / one_core.throughput:.2f}x one core)"
    )
    for h in headline:
        if h.name.endswith(TRAINER_PATTERN):
            median = statistics.median(rounds.ratios(h.name))
            verdict = "meets" if median >= 0.9 else "misses"
            print(
                f"{h.name} (the trainer's pattern): {spread(rounds.ratios(h.name))} of best bare; the median "
                f"{verdict} the target >= 90%"
            )
    best_service = max(headline, key=lambda h: statistics.median(rounds.ratios(h.name)))
    print(
        f"best service: {best_service.name} = {spread(rounds.ratios(best_service.name))} of best bare, "
        f"{rounds.median_rate(best_service.name) / reference.throughput:.2f}x the reference pattern"
    )
    all_workers = rounds.median_rate("service grpc, 16 clients x 1 image/request")
    print(f"service scaling 1 -> {CORES} worker processes: {all_workers / one_worker.throughput:.2f}x (ideal {CORES}x)")
    print(f"median per-image latency of the bare engine: {statistics.median(one_core.latencies) * 1e3:.0f} ms")
    for row in overheads:
        print(f"{row.name}: p50 {row.percentile(50) * 1e3:.2f} ms, p99 {row.percentile(99) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
