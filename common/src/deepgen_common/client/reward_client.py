"""Client of the reward contract: deadlines, bounded retries with backoff, load balancing over
replicas (by the transport), a circuit breaker, and automatic splitting of work to the service's
limits."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from deepgen_common.client.breaker import CircuitBreaker
from deepgen_common.client.credentials import ClientCredentials
from deepgen_common.client.failover import FailoverTransport
from deepgen_common.client.transports import (
    GrpcTransport,
    HttpTransport,
    OverloadedError,
    TransientError,
    Transport,
)
from deepgen_common.client.urls import ServiceURL, parse_service_url
from deepgen_common.types import Mode, Result, Sample, ServiceInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

# Per-sample overhead of a request beyond the image bytes (prompt, ids, framing); base64 adds 4/3.
_SAMPLE_OVERHEAD_BYTES = 4096


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt k waits U(0, min(max_s, initial_s * 2**k))."""

    max_attempts: int = 5
    initial_s: float = 0.2
    max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.max_s, self.initial_s * 2**attempt))


def make_transport(
    url: str, credentials: ClientCredentials | None = None, max_message_bytes: int = 256 * 1024 * 1024
) -> Transport:
    """The transport for a service URL (forms in `deepgen_common.client.urls`): HTTP/JSON or gRPC,
    TLS for `https://` / `grpcs://`; an address list gets round-robin with failover."""
    credentials = credentials if credentials is not None else ClientCredentials.from_env()
    parts = parse_service_url(url).split()

    def one(part: ServiceURL) -> Transport:
        if part.protocol == "http":
            return HttpTransport(part, credentials)
        return GrpcTransport(part, credentials, max_message_bytes)

    if len(parts) == 1:
        return one(parts[0])
    return FailoverTransport([one(p) for p in parts], [str(p) for p in parts])


class RewardClient:
    """Thread-safe, synchronous client of one reward service (all of its replicas).

    `url` takes any form of `deepgen_common.client.urls` (several addresses included); the token and
    TLS roots come from `credentials`, by default from the environment (`ClientCredentials.from_env`).

    `score` splits the samples into requests within the service's limits (never splitting a group),
    sends them concurrently, retries UNAVAILABLE / RESOURCE_EXHAUSTED / transport errors with
    backoff, and fails fast with `CircuitOpenError` while the service is down.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        max_concurrent_requests: int = 4,
        credentials: ClientCredentials | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.breaker = breaker or CircuitBreaker(url)
        self._transport = transport or make_transport(url, credentials)
        self._pool = ThreadPoolExecutor(max_concurrent_requests, thread_name_prefix="reward-client")
        self._info: ServiceInfo | None = None

    def _with_retries(self, what: str, call: Callable[[], T]) -> T:
        """`call`, retried: an unreachable service up to `retry.max_attempts` times with backoff (each
        failure counts towards the breaker); an overloaded one (429 / RESOURCE_EXHAUSTED: it answered,
        so the breaker counts a success) for as long as `timeout_s` allows, waiting at least the
        service's Retry-After."""
        started = time.monotonic()
        attempt = 0
        while True:
            self.breaker.before_call()
            try:
                result = call()
            except OverloadedError as exc:
                error: Exception = exc
                self.breaker.record_success()
                delay = max(exc.retry_after_s or 0.0, self.retry.delay(attempt))
                if time.monotonic() - started + delay > self.timeout_s:
                    raise OverloadedError(
                        f"{what} on {self.url} still refused after {time.monotonic() - started:.0f}s "
                        f"(timeout_s={self.timeout_s:g}): {exc}",
                        exc.retry_after_s,
                    ) from None
            except TransientError as exc:
                error = exc
                self.breaker.record_failure()
                if attempt + 1 >= self.retry.max_attempts:
                    raise TransientError(f"{what} on {self.url} failed after {attempt + 1} attempts: {exc}") from None
                delay = self.retry.delay(attempt)
            except BaseException:
                self.breaker.record_success()  # the service answered; bad input is not an outage
                raise
            else:
                self.breaker.record_success()
                return result
            log.warning("retrying %s on %s in %.2fs: %s", what, self.url, delay, error)
            time.sleep(delay)
            attempt += 1

    def info(self, refresh: bool = False) -> ServiceInfo:
        """The service's name, limits and capabilities (cached after the first call)."""
        if self._info is None or refresh:
            self._info = self._with_retries("GetInfo", lambda: self._transport.info(self.timeout_s))
        return self._info

    def score(self, samples: Sequence[Sample], mode: Mode = Mode.POINTWISE) -> list[Result]:
        """One result per sample, in order. Images over the service's byte limit get an ERROR result
        without being sent."""
        if not samples:
            return []
        limits = self.info().limits
        results: list[Result | None] = [None] * len(samples)
        sendable: list[int] = []
        for i, s in enumerate(samples):
            if len(s.image) > limits.max_image_bytes:
                results[i] = Result.failed(
                    f"image is {len(s.image)} bytes, over the service limit of {limits.max_image_bytes} bytes"
                )
            else:
                sendable.append(i)
        chunks = _chunk(sendable, samples, mode, limits.max_batch_size, limits.max_request_bytes)
        futures = [
            self._pool.submit(
                self._with_retries, "Score", _bind(self._transport, [samples[i] for i in chunk], mode, self.timeout_s)
            )
            for chunk in chunks
        ]
        for chunk, future in zip(chunks, futures, strict=True):
            for i, result in zip(chunk, future.result(), strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    def score_images(
        self,
        images: Sequence[bytes],
        prompts: Sequence[str],
        group_ids: Sequence[str] | None = None,
        mode: Mode = Mode.POINTWISE,
    ) -> list[Result]:
        """Convenience form of `score` for parallel lists of encoded images and prompts."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")
        if group_ids is not None and len(group_ids) != len(images):
            raise ValueError(f"got {len(images)} images but {len(group_ids)} group ids; pass one per image")
        groups = group_ids or [""] * len(images)
        return self.score(
            [Sample(image=im, prompt=p, group_id=g) for im, p, g in zip(images, prompts, groups, strict=True)], mode
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._transport.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _bind(transport: Transport, samples: list[Sample], mode: Mode, timeout_s: float) -> Callable[[], list[Result]]:
    return lambda: transport.score(samples, mode, timeout_s)


def _chunk(
    indices: list[int], samples: Sequence[Sample], mode: Mode, max_batch: int, max_bytes: int
) -> list[list[int]]:
    """Split sample indices into requests of at most `max_batch` samples and 4/5 of `max_bytes`, counted
    base64-encoded: such a request fits an HTTP body, and its images without base64 (3/5) fit a gRPC
    message (2/3). In group mode a group is never split; its samples are gathered into one request even
    when not adjacent."""
    if mode is Mode.GROUP:
        by_group: dict[str, list[int]] = {}
        for i in indices:
            by_group.setdefault(samples[i].group_id, []).append(i)
        units = list(by_group.values())
    else:
        units = [[i] for i in indices]

    def size(unit: list[int]) -> int:
        return sum(len(samples[i].image) * 4 // 3 + _SAMPLE_OVERHEAD_BYTES for i in unit)

    budget = max_bytes * 4 // 5
    chunks: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for unit in units:
        unit_bytes = size(unit)
        if len(unit) > max_batch:
            raise ValueError(
                f"group {samples[unit[0]].group_id!r} has {len(unit)} samples, over the service's "
                f"max batch of {max_batch}"
            )
        if current and (len(current) + len(unit) > max_batch or current_bytes + unit_bytes > budget):
            chunks.append(current)
            current, current_bytes = [], 0
        current.extend(unit)
        current_bytes += unit_bytes
    if current:
        chunks.append(current)
    return chunks
