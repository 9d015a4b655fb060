"""Hand freed heap memory back to the operating system after a large request."""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc keeps the pages of freed chunks in its per-thread arenas; gRPC's core reads a message into many
# small slices across those arenas, so the process would otherwise keep a burst's peak for good.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only; musl and macOS have none

# Trimming walks every arena (a few milliseconds on a fragmented heap); below this size a request leaves
# too little to matter.
TRIM_AFTER_BYTES = 1 << 20


def release_after(size: int) -> None:
    """Return free heap pages to the OS (glibc `malloc_trim`) once a request of `size` bytes is gone."""
    if _MALLOC_TRIM is not None and size >= TRIM_AFTER_BYTES:
        _MALLOC_TRIM(0)
