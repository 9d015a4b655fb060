"""A thread-safe circuit breaker: fail fast while a service is down, probe it again after a pause."""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable


class BreakerState(enum.StrEnum):
    CLOSED = "closed"  # calls flow
    OPEN = "open"  # calls fail fast until `reset_after_s` has passed
    HALF_OPEN = "half_open"  # one trial call decides between CLOSED and OPEN


class CircuitOpenError(ConnectionError):
    """Raised instead of calling a service whose breaker is open."""


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures; after `reset_after_s` lets one trial
    call through (half-open); its success closes the breaker, its failure re-opens it."""

    def __init__(
        self,
        name: str,
        failure_threshold: int = 5,
        reset_after_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state()

    def _state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.reset_after_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def before_call(self) -> None:
        """Raise CircuitOpenError unless a call may go out now."""
        with self._lock:
            state = self._state()
            if state is BreakerState.CLOSED:
                return
            if state is BreakerState.HALF_OPEN and not self._trial_in_flight:
                self._trial_in_flight = True
                return
            wait = max(0.0, self.reset_after_s - (self._clock() - (self._opened_at or 0.0)))
            raise CircuitOpenError(
                f"circuit breaker for {self.name} is open after {self._failures} consecutive failures; "
                f"next trial in {wait:.1f}s"
            )

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._trial_in_flight = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._trial_in_flight or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
            self._trial_in_flight = False
