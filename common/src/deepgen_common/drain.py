"""Requests in flight and the drain after SIGTERM.

Both transports register each API request's task here. On SIGTERM the service starts draining: new
requests get UNAVAILABLE / 503 at once, in-flight ones may finish until the drain deadline, and those
still running then are cancelled with `SHUTDOWN` so their transport answers 503 / UNAVAILABLE
(which clients retry elsewhere) instead of an internal error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from deepgen_common.errors import ShuttingDown

SHUTDOWN = "service shutting down"


class Drain:
    """In-flight request tasks and the draining flag of one service."""

    def __init__(self) -> None:
        self.draining = False
        self._tasks: set[asyncio.Task[object]] = set()
        self._aborted: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def check_open(self) -> None:
        """Raise ShuttingDown once draining has started."""
        if self.draining:
            raise ShuttingDown("service is shutting down; retry on another replica")

    @contextlib.contextmanager
    def track(self, task: asyncio.Task[object]) -> Iterator[None]:
        """Count `task` as in flight for the block."""
        self._tasks.add(task)
        self._idle.clear()
        try:
            yield
        finally:
            self._tasks.discard(task)
            self._aborted.discard(task)
            if not self._tasks:
                self._idle.set()

    def aborted(self, task: asyncio.Task[object]) -> bool:
        """True when `task` was cancelled by the drain (answer 503 / UNAVAILABLE, not CANCELLED)."""
        return task in self._aborted

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests, wait up to `timeout_s` for in-flight ones, then cancel the rest and wait
        for them to answer. Returns how many were cancelled."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        late = list(self._tasks)
        for task in late:
            self._aborted.add(task)
            task.cancel(SHUTDOWN)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._idle.wait()
        return len(late)
