"""The deadline of the request being served, set by the transport and read by admission.

gRPC gives each call its own deadline; over HTTP a client names it with `x-request-timeout-ms`.
Either way the transport binds it to the request's context before the handler runs, so domain code
(`Admission`, a backend) asks `remaining_s()` without any transport import.
"""

from __future__ import annotations

import contextvars
import math
import time

DEADLINE_HEADER = "x-request-timeout-ms"

_deadline: contextvars.ContextVar[float] = contextvars.ContextVar("deadline", default=math.inf)


def set_deadline(timeout_s: float) -> float:
    """Bind `now + timeout_s` (monotonic) as this request's deadline; returns it."""
    deadline = time.monotonic() + timeout_s
    _deadline.set(deadline)
    return deadline


def remaining_s() -> float:
    """Seconds left before the current request's deadline (inf outside a request)."""
    return _deadline.get() - time.monotonic()


def parse_timeout_header(value: str | None, default_s: float) -> float:
    """Seconds from an `x-request-timeout-ms` header value, `default_s` when absent; raises ValueError
    with a message naming the header when it is not a positive integer."""
    if value is None:
        return default_s
    if not value.strip().isdigit() or int(value) <= 0:
        raise ValueError(f"{DEADLINE_HEADER} must be a positive integer of milliseconds, got {value[:40]!r}")
    return int(value) / 1000.0
