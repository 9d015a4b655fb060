"""A pool of OCR workers fed from one queue, with a time budget per sample.

Every worker takes the next queued sample as soon as it is free, so the samples of one request
spread over all workers, and samples of concurrent requests interleave. A sample that runs past
`sample_timeout_s` becomes an ERROR result and its worker is killed and replaced (a worker process
is killed; a worker thread cannot be, so it is abandoned to finish on its own and a fresh thread with
a fresh engine takes its place). A worker process that dies fails only the sample it was scoring.
A sample whose caller has gone (its request cancelled) is dropped from the queue before it starts.
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
from reward_ocr.worker import READY, OcrWorker, Scored, Task, WorkerConfig, serve

log = logging.getLogger(__name__)

Executor = Literal["process", "thread"]
_RESTART_DELAY_S = 1.0  # between attempts to start a worker whose engine failed to load


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
        # Loading the models takes seconds; a worker that cannot load them at all dies (EOF).
        if await self._receive(timeout_s=None) != READY:
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

    def __init__(self, config: WorkerConfig, executor: Executor, workers: int, sample_timeout_s: float) -> None:
        self.config = config
        self.executor = executor
        self.workers = workers
        self.sample_timeout_s = sample_timeout_s
        self.started = 0  # samples handed to a worker, since start
        self.replaced = 0  # workers replaced after a timeout or a crash, since start
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue()
        self._loops: list[asyncio.Task[None]] = []
        self._live: dict[int, _Worker] = {}

    def _new_worker(self, index: int) -> _Worker:
        kind = _ProcessWorker if self.executor == "process" else _ThreadWorker
        return kind(self.config, f"ocr-{index}")

    async def start(self) -> None:
        """Start every worker and wait until all have loaded their engines."""
        workers = [self._new_worker(i) for i in range(self.workers)]
        await asyncio.gather(*(w.start() for w in workers))
        self._live = dict(enumerate(workers))
        self._loops = [asyncio.create_task(self._serve(i), name=f"ocr-{i}") for i in range(self.workers)]

    async def score(self, task: Task) -> PoolResult:
        """Queue one sample and wait for its result. Cancelling the wait drops a sample that has not
        started; one that has started finishes and its result is discarded."""
        queued = _Queued(task, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(queued)
        return await queued.future

    async def _serve(self, index: int) -> None:
        """Worker `index`'s loop: take the next live sample, score it, replace the worker if it
        got stuck or died."""
        worker = self._live[index]
        while True:
            item = await self._queue.get()
            if item.future.done():  # its request was cancelled while it waited
                continue
            started = time.perf_counter()
            self.started += 1
            try:
                scored = await worker.run(item.task, self.sample_timeout_s)
            except Exception as exc:  # this loop must outlive any failure, or the worker would be lost
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
                await worker.stop(kill=True)
                worker = await self._restart(index)
                continue
            if not item.future.done():
                item.future.set_result(PoolResult(scored, started - item.queued_at))

    async def _restart(self, index: int) -> _Worker:
        while True:
            worker = self._new_worker(index)
            try:
                await worker.start()
            except Exception:  # an engine that cannot load now may load later (e.g. memory pressure)
                log.exception("OCR worker failed to start; retrying", extra={"fields": {"worker": index}})
                await worker.stop(kill=True)
                await asyncio.sleep(_RESTART_DELAY_S)
                continue
            self._live[index] = worker
            self.replaced += 1
            return worker

    async def close(self) -> None:
        """Stop the loops and the workers; samples still queued are cancelled."""
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        while not self._queue.empty():
            self._queue.get_nowait().future.cancel()
        await asyncio.gather(*(w.stop(kill=False) for w in self._live.values()))
        self._live.clear()
