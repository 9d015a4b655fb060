"""Admission by time: a request is refused at once when it cannot be answered before its deadline.

The service knows how many samples are admitted and not answered (`pending`), how many its backend
works on at once now (`workers`, asked at every check: an OCR worker that cannot start drops out) and
the recent per-sample service time (`ServiceMetrics.sample_seconds`, which the backend reports). A new
request of n samples would start after about `(pending - workers + 1) * t / workers` seconds and
finish after `ceil((pending + n) / workers) * t`.
It is refused (RESOURCE_EXHAUSTED / 429 with a retry-after) when it would finish after its deadline
(keeping `HEADROOM`), start later than MAX_QUEUE_WAIT_S, or push `pending` over MAX_QUEUED_SAMPLES.
The transports run the same check for one sample before they read a body, so refusals under
overload cost no parsing.

`ByteBudget` bounds the memory of requests in flight: a request takes its body size from the budget
before its body is read (HTTP) or right after its message is read (gRPC) and gives it back when
answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

from deepgen_common.errors import Overloaded
from deepgen_common.malloc import release_after
from deepgen_common.metrics import ServiceMetrics

# Admit only what the prediction finishes within this share of the time left: the service time is a
# recent average, and CPU contention or a slow sample would otherwise push admitted requests past
# their deadline.
HEADROOM = 0.8


class Admission:
    """Samples admitted and not answered, and the time-based admission check.

    All transports run on one event loop, so plain counters are race-free.
    """

    def __init__(
        self, workers: Callable[[], int], max_queued: int, max_queue_wait_s: float, metrics: ServiceMetrics
    ) -> None:
        self._workers = workers
        self.max_queued = max_queued
        self.max_queue_wait_s = max_queue_wait_s
        self.pending = 0
        self._metrics = metrics

    @property
    def workers(self) -> int:
        """Samples the backend works on at once now; at least 1 (a backend with none is not ready and
        its requests are refused before admission)."""
        return max(1, self._workers())

    def predict(self, n: int) -> tuple[float, float]:
        """(seconds until the first of n new samples starts, seconds until the last one is done), from
        the recent per-sample service time; (0, 0) before anything was measured."""
        t = self._metrics.sample_seconds
        if t is None:
            return 0.0, 0.0
        workers = self.workers
        start = max(0, self.pending - workers + 1) * t / workers
        done = math.ceil((self.pending + n) / workers) * t
        return start, done

    def check(self, n: int, remaining_s: float) -> None:
        """Raise Overloaded (with `retry_after_s`) if n more samples cannot be answered within
        `remaining_s` seconds."""
        start, done = self.predict(n)
        if self.pending + n > self.max_queued:
            raise Overloaded(
                f"queue is full: {self.pending} samples pending, {n} more would exceed "
                f"MAX_QUEUED_SAMPLES={self.max_queued}; retry later",
                retry_after_s=_seconds(start),
            )
        if self._metrics.sample_seconds is None and self.pending >= self.workers:
            raise Overloaded(
                f"{self.pending} samples pending and no service time measured yet; retry in a moment",
                retry_after_s=1,
            )
        if start > self.max_queue_wait_s:
            raise Overloaded(
                f"{self.pending} samples pending: this request would wait about {start:.1f} s to start, over "
                f"MAX_QUEUE_WAIT_S={self.max_queue_wait_s:g}; retry later",
                retry_after_s=_seconds(start - self.max_queue_wait_s),
            )
        if done > HEADROOM * remaining_s:
            raise Overloaded(
                f"{self.pending} samples pending: this request would be answered in about {done:.1f} s, after its "
                f"deadline ({max(remaining_s, 0):.1f} s left); retry later or with a longer deadline",
                retry_after_s=_seconds(done - HEADROOM * remaining_s),
            )

    @contextlib.contextmanager
    def admit(self, n: int, remaining_s: float) -> Iterator[None]:
        """Check, then count n samples as pending until the block exits."""
        self.check(n, remaining_s)
        self.pending += n
        self._metrics.queue_depth.set(self.pending)
        try:
            yield
        finally:
            self.pending -= n
            self._metrics.queue_depth.set(self.pending)


def _seconds(s: float) -> int:
    """A Retry-After value: whole seconds, at least 1."""
    return max(1, math.ceil(s))


class Held:
    """Bytes one request holds in a `ByteBudget`; `shrink` gives back what it turned out not to need."""

    def __init__(self, budget: ByteBudget, n: int) -> None:
        self._budget = budget
        self.n = n

    def shrink(self, n: int) -> None:
        """Keep only n bytes (e.g. the real size once a message of unknown size has been read)."""
        if n < self.n:
            self._budget._release(self.n - n)
            self.n = n


class ByteBudget:
    """A first-come first-served budget of bytes that requests hold while they are in flight."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def hold(self, n: int, timeout_s: float) -> AsyncIterator[Held]:
        """Hold n bytes (at most the capacity) for the block; wait up to `timeout_s` for room, then
        raise Overloaded. When a large hold ends, the heap its request freed goes back to the OS, so the
        next request starts from the idle process's memory, not on top of what this one left."""
        n = min(n, self.capacity)
        if self._waiters or self.used + n > self.capacity:
            entry = (n, asyncio.get_running_loop().create_future())
            self._waiters.append(entry)
            try:
                async with asyncio.timeout(max(timeout_s, 0.0)):
                    await entry[1]
            except BaseException as exc:
                if entry[1].done() and not entry[1].cancelled():  # granted as we gave up: give it back
                    self._release(n)
                elif entry in self._waiters:
                    self._waiters.remove(entry)
                if isinstance(exc, TimeoutError):
                    raise Overloaded(
                        f"{self.used} bytes of requests are being read or scored (MAX_INFLIGHT_BYTES="
                        f"{self.capacity}); retry later",
                        retry_after_s=1,
                    ) from None
                raise
        else:
            self.used += n
        held = Held(self, n)
        try:
            yield held
        finally:
            release_after(held.n)
            self._release(held.n)

    def _release(self, n: int) -> None:
        self.used -= n
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            size, future = self._waiters.popleft()
            if not future.done():  # a cancelled waiter is skipped; its task cleans up after itself
                self.used += size
                future.set_result(None)
