"""A pool of OCR workers fed from one queue, with a time budget per sample.

Every worker takes the next queued sample as soon as it is free, so the samples of one request
spread over all workers, and samples of concurrent requests interleave. A sample that runs past
`sample_timeout_s` becomes an ERROR result and its worker is killed and replaced (a worker process
is killed; a worker thread cannot be, so it is abandoned to finish on its own and a fresh thread with
a fresh engine takes its place). A worker process that dies fails only the sample it was scoring.
A sample whose caller has gone (its request cancelled) is dropped from the queue before it starts.

A worker whose replacement cannot start (its engine fails to load) is retried with exponential
back-off (1 s doubling up to 60 s; the next failure after a successful start begins at 1 s again) and
stops counting as live until a start succeeds. A worker being replaced after a crash or a timeout
still counts: its replacement normally loads within seconds. While no worker is live the samples
still queued, and any queued afterwards, end at once as ERROR results that say so, instead of waiting
for a worker that may never come; the backend reports not ready meanwhile, so new requests are
refused with UNAVAILABLE and clients go to another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Literal, Protocol

from deepgen_common.types import Result
from reward_ocr.worker import READY, LoadFailed, OcrWorker, Scored, Task, WorkerConfig, serve

log = logging.getLogger(__name__)

Executor = Literal["process", "thread"]
RESTART_DELAY_S = 1.0  # wait after the first failed start of a worker; doubles after each further failure
MAX_RESTART_DELAY_S = 60.0  # the longest wait between two attempts to start a worker


class WorkerDied(Exception):
    """The worker stopped answering for a reason other than the time budget (its process died)."""


class _Worker(Protocol):
    async def start(self) -> None:
        """Start the worker and wait until its engine is loaded."""

    async def run(self, task: Task, timeout_s: float) -> Scored:
        """Score one task; raises TimeoutError past `timeout_s`, WorkerDied if the worker died."""

    async def stop(self, kill: bool) -> None:
        """Stop the worker: kill it (it is stuck) or let it finish and exit."""


class _ProcessWorker:
    """An OcrWorker in its own process, fed over a pipe (spawned, not forked: the service process
    runs gRPC threads, which must not be forked)."""

    def __init__(self, config: WorkerConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn: Connection | None = None

    async def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(theirs, self.config), name=self.name, daemon=True)
        self.process.start()
        theirs.close()  # so that our end sees EOF when the process dies
        self.conn = ours
        # Loading the models takes seconds; a worker that cannot load them says why and exits.
        reply = await self._receive(timeout_s=None)
        if isinstance(reply, LoadFailed):
            raise WorkerDied(f"{self.name} could not load its engine: {reply.error}")
        if reply != READY:
            raise WorkerDied(f"{self.name} did not report ready")

    async def run(self, task: Task, timeout_s: float) -> Scored:
        assert self.conn is not None, "run() before start()"
        try:
            self.conn.send(task)
        except OSError as exc:
            raise WorkerDied(f"{self.name} is gone: {exc}") from None
        return await self._receive(timeout_s)

    async def _receive(self, timeout_s: float | None) -> object:
        assert self.conn is not None
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        fd = self.conn.fileno()
        loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
        try:
            await asyncio.wait_for(readable, timeout_s)
        finally:
            loop.remove_reader(fd)
        try:
            return self.conn.recv()  # the reply is small: it arrives whole once the pipe is readable
        except (EOFError, OSError):
            code = self.process.exitcode if self.process is not None else None
            raise WorkerDied(f"{self.name} died (exit code {code})") from None

    async def stop(self, kill: bool) -> None:
        if self.conn is not None:
            self.conn.close()  # the worker's recv() sees EOF and it exits
        if self.process is not None:
            if kill:
                self.process.kill()
            await asyncio.to_thread(self.process.join, 10)
            if self.process.is_alive():
                self.process.kill()


class _ThreadWorker:
    """An OcrWorker on a dedicated thread of the service process."""

    def __init__(self, config: WorkerConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.executor: ThreadPoolExecutor | None = None
        self.local = threading.local()

    async def start(self) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=self.name)
        await asyncio.wrap_future(self.executor.submit(self._load))

    def _load(self) -> None:
        self.local.worker = OcrWorker(self.config)

    async def run(self, task: Task, timeout_s: float) -> Scored:
        assert self.executor is not None, "run() before start()"
        return await asyncio.wait_for(asyncio.wrap_future(self.executor.submit(self._score, task)), timeout_s)

    def _score(self, task: Task) -> Scored:
        return self.local.worker.score(task)

    async def stop(self, kill: bool) -> None:
        if self.executor is None:
            return
        if kill:  # a thread cannot be killed: a stuck one is left to finish and exit on its own
            self.executor.shutdown(wait=False, cancel_futures=True)
        else:
            await asyncio.to_thread(self.executor.shutdown, wait=True, cancel_futures=True)


@dataclass
class _Queued:
    task: Task
    future: asyncio.Future[Scored]
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class PoolResult:
    scored: Scored
    queue_s: float  # seconds the sample waited for a free worker


class WorkerPool:
    """`workers` OCR workers (processes or threads) serving one queue of samples."""

    def __init__(
        self,
        config: WorkerConfig,
        executor: Executor,
        workers: int,
        sample_timeout_s: float,
        restart_delay_s: float = RESTART_DELAY_S,
        max_restart_delay_s: float = MAX_RESTART_DELAY_S,
    ) -> None:
        self.config = config
        self.executor = executor
        self.workers = workers
        self.sample_timeout_s = sample_timeout_s
        self.restart_delay_s = restart_delay_s
        self.max_restart_delay_s = max_restart_delay_s
        self.started = 0  # samples handed to a worker, since start
        self.replaced = 0  # workers replaced after a timeout or a crash, since start
        self.start_error: str | None = None  # why the last failed start failed
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue()
        self._loops: list[asyncio.Task[None]] = []
        self._running: dict[int, _Worker] = {}  # the workers started and not stopped, by index
        self._failing: set[int] = set()  # indices whose last start failed (waiting to try again)

    @property
    def live(self) -> int:
        """Workers that serve the queue or will shortly: all but those whose last start failed."""
        return self.workers - len(self._failing)

    def _new_worker(self, index: int) -> _Worker:
        kind = _ProcessWorker if self.executor == "process" else _ThreadWorker
        return kind(self.config, f"ocr-{index}")

    async def start(self) -> None:
        """Start every worker and wait until all have loaded their engines."""
        workers = [self._new_worker(i) for i in range(self.workers)]
        await asyncio.gather(*(w.start() for w in workers))
        self._running = dict(enumerate(workers))
        self._loops = [asyncio.create_task(self._serve(i), name=f"ocr-{i}") for i in range(self.workers)]

    async def score(self, task: Task) -> PoolResult:
        """Queue one sample and wait for its result (an ERROR at once while no worker is live).
        Cancelling the wait drops a sample that has not started; one that has started finishes and its
        result is discarded."""
        if self.live == 0:
            return PoolResult(Scored(Result.failed(self._no_worker_reason()), {}), 0.0)
        queued = _Queued(task, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(queued)
        return await queued.future

    async def _serve(self, index: int) -> None:
        """Worker `index`'s loop: take the next live sample and score it. The loop keeps no reference to
        a finished sample, so its image is freed while the worker waits for the next one."""
        worker = self._running[index]
        while True:
            worker = await self._score(index, worker, await self._queue.get())

    async def _score(self, index: int, worker: _Worker, item: _Queued) -> _Worker:
        """Score one queued sample; returns the worker to go on with, a new one if it got stuck or died."""
        if item.future.done():  # its request was cancelled while it waited
            return worker
        started = time.perf_counter()
        self.started += 1
        try:
            scored = await worker.run(item.task, self.sample_timeout_s)
        except Exception as exc:  # the loop must outlive any failure, or the worker would be lost
            if isinstance(exc, TimeoutError):
                reason = (
                    f"OCR took over {self.sample_timeout_s:g} s (OCR_SAMPLE_TIMEOUT_S) on this sample; "
                    "its worker was replaced"
                )
            elif isinstance(exc, WorkerDied):
                reason = f"OCR worker crashed while scoring this sample ({exc}); retry"
            else:
                log.exception("OCR worker failed", extra={"fields": {"worker": index}})
                reason = f"OCR worker failed while scoring this sample ({type(exc).__name__}); retry"
            log.error("replacing OCR worker", extra={"fields": {"worker": index, "reason": reason}})
            if not item.future.done():
                item.future.set_result(PoolResult(Scored(Result.failed(reason), {}), started - item.queued_at))
            del self._running[index]
            await worker.stop(kill=True)
            return await self._restart(index)
        if not item.future.done():
            item.future.set_result(PoolResult(scored, started - item.queued_at))
        return worker

    async def _restart(self, index: int) -> _Worker:
        """A fresh worker for slot `index`: tried at once, then after waits that double from
        `restart_delay_s` up to `max_restart_delay_s` while its start fails."""
        delay_s = self.restart_delay_s
        attempt = 1
        while True:
            worker = self._new_worker(index)
            try:
                await worker.start()
            except BaseException as exc:  # an engine that cannot load now may load later (e.g. memory pressure)
                await worker.stop(kill=True)
                if not isinstance(exc, Exception):  # cancelled (the pool is closing)
                    raise
                self._start_failed(index, attempt, delay_s, exc)
                await asyncio.sleep(delay_s)
                delay_s = min(2 * delay_s, self.max_restart_delay_s)
                attempt += 1
                continue
            self._running[index] = worker
            self._failing.discard(index)
            self.replaced += 1
            fields = {"worker": index, "attempts": attempt, "live": self.live, "workers": self.workers}
            log.log(logging.INFO if attempt == 1 else logging.WARNING, "OCR worker started", extra={"fields": fields})
            return worker

    def _start_failed(self, index: int, attempt: int, delay_s: float, exc: Exception) -> None:
        """Count worker `index` out of the live ones and, when none is left, end the queued samples."""
        self.start_error = f"{type(exc).__name__}: {exc}"
        self._failing.add(index)
        fields = {
            "worker": index,
            "attempt": attempt,
            "retry_in_s": delay_s,
            "error": self.start_error,
            "live": self.live,
            "workers": self.workers,
        }
        # The traceback once per outage; later attempts name the error only.
        log.error("OCR worker failed to start", exc_info=exc if attempt == 1 else None, extra={"fields": fields})
        if self.live == 0 and attempt == 1:  # this worker was the last live one
            failed = 0
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_result(PoolResult(Scored(Result.failed(self._no_worker_reason()), {}), 0.0))
                    failed += 1
            log.error(
                "no OCR worker is live: not ready until one starts",
                extra={"fields": {"queued_samples_failed": failed, "error": self.start_error}},
            )

    def _no_worker_reason(self) -> str:
        return (
            f"no OCR worker is running: all {self.workers} fail to start ({self.start_error}); "
            "retry later or on another replica"
        )

    async def close(self) -> None:
        """Stop the loops and the workers; samples still queued are cancelled."""
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        while not self._queue.empty():
            self._queue.get_nowait().future.cancel()
        await asyncio.gather(*(w.stop(kill=False) for w in self._running.values()))
        self._running.clear()
