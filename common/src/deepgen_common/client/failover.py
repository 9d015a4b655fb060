"""Round-robin over the addresses of a service URL (`grpc://h1:p1,h2:p2`) with failover: a call
that fails with `TransientError` (unreachable, overloaded, restarting) moves on to the next address
at once, and the failed address sits out `cooldown_s` so later calls do not wait on it first."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from deepgen_common.client.transports import TransientError, Transport
from deepgen_common.types import Mode, Result, Sample, ServiceInfo

log = logging.getLogger(__name__)
M = TypeVar("M")
R = TypeVar("R")


class RoundRobin(Generic[M]):
    """Thread-safe rotation over `members` (named by `names` in errors and logs)."""

    def __init__(self, members: Sequence[M], names: Sequence[str], cooldown_s: float = 5.0) -> None:
        if not members or len(members) != len(names):
            raise ValueError(f"need one name per member and at least one member, got {len(members)} / {len(names)}")
        self.members, self.names = list(members), list(names)
        self.cooldown_s = cooldown_s
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._failed_until = [0.0] * len(members)

    def order(self) -> list[int]:
        """Member indices to try for one call: rotated by one per call, members cooling down last."""
        n = len(self.members)
        start = next(self._next) % n
        rotation = [(start + k) % n for k in range(n)]
        now = time.monotonic()
        with self._lock:
            return sorted(rotation, key=lambda i: self._failed_until[i] > now)

    def mark_failed(self, index: int, error: Exception) -> None:
        with self._lock:
            self._failed_until[index] = time.monotonic() + self.cooldown_s
        if len(self.members) > 1:
            log.warning("%s failed (%s); next address", self.names[index], error)

    def call(self, fn: Callable[[M], R]) -> R:
        """`fn` on the next member; on TransientError the one after, until every member has failed."""
        errors = []
        for i in self.order():
            try:
                return fn(self.members[i])
            except TransientError as exc:
                self.mark_failed(i, exc)
                errors.append(f"{self.names[i]}: {exc}")
        if len(errors) == 1:
            raise TransientError(errors[0])
        raise TransientError(f"all {len(errors)} addresses failed: " + "; ".join(errors))


class FailoverTransport:
    """A `Transport` over the transports of several addresses of one service."""

    def __init__(self, transports: Sequence[Transport], names: Sequence[str], cooldown_s: float = 5.0) -> None:
        self._robin = RoundRobin(transports, names, cooldown_s)

    def score(self, samples: Sequence[Sample], mode: Mode, timeout_s: float) -> list[Result]:
        return self._robin.call(lambda t: t.score(samples, mode, timeout_s))

    def info(self, timeout_s: float) -> ServiceInfo:
        return self._robin.call(lambda t: t.info(timeout_s))

    def close(self) -> None:
        for transport in self._robin.members:
            transport.close()
