"""The transport-independent request path of a reward service: validate, admit, score, count.

A backend is plain Python (KServe style): `load()` once, `ready()` as a flag, `score()` per request.
Both transports (gRPC and HTTP) call `RewardService.score`, so limits and metrics are enforced once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Protocol

from deepgen_common.api import Lifecycle
from deepgen_common.errors import InvalidInput, NotReady, Overloaded
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.settings import ServiceSettings
from deepgen_common.types import Mode, Result, Sample, ServiceInfo

log = logging.getLogger(__name__)

REWARD_API = "deepgen.reward.v1"


class Backend(Lifecycle, Protocol):
    """What a reward service implements; everything else comes from the kit."""

    capabilities: tuple[Mode, ...]

    async def score(self, samples: Sequence[Sample], mode: Mode) -> list[Result]:
        """One result per sample, in order. Per-sample problems are ERROR results, not exceptions."""


def check_batch_size(field: str, n: int, limit: int) -> None:
    """A request's batch must hold 1..MAX_BATCH_SIZE items; raises InvalidInput naming `field`."""
    if n == 0:
        raise InvalidInput(f"{field} is empty: send at least one item")
    if n > limit:
        raise InvalidInput(f"{field} has {n} entries, over the limit of {limit} (MAX_BATCH_SIZE); split the batch")


class Admission:
    """Bounded count of samples admitted and not yet answered: the service's queue.

    All transports run on one event loop, so a plain counter is race-free.
    """

    def __init__(self, capacity: int, metrics: ServiceMetrics) -> None:
        self.capacity = capacity
        self.pending = 0
        self._metrics = metrics

    @contextlib.contextmanager
    def admit(self, n: int) -> Iterator[None]:
        if self.pending + n > self.capacity:
            raise Overloaded(
                f"queue is full: {self.pending} samples pending, {n} more would exceed "
                f"MAX_QUEUED_SAMPLES={self.capacity}; retry later"
            )
        self.pending += n
        self._metrics.queue_depth.set(self.pending)
        try:
            yield
        finally:
            self.pending -= n
            self._metrics.queue_depth.set(self.pending)


class RewardService:
    """Validates requests against the limits, admits them to the bounded queue and scores them."""

    def __init__(self, backend: Backend, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.admission = Admission(settings.max_queued_samples, metrics)
        self.name, self.version, self.description = backend.name, backend.version, backend.description
        metrics.info.info({"name": backend.name, "version": backend.version, "backend": backend.description})

    async def load(self) -> None:
        await self.backend.load()

    async def close(self) -> None:
        await self.backend.close()

    def info(self) -> ServiceInfo:
        return ServiceInfo(
            name=self.backend.name,
            version=self.backend.version,
            api=REWARD_API,
            backend=self.backend.description,
            limits=self.settings.limits,
            capabilities=self.backend.capabilities,
        )

    def ready(self) -> bool:
        return self.backend.ready()

    def waiting_for(self) -> dict[str, str]:
        return self.backend.waiting_for()

    def validate(self, samples: Sequence[Sample], mode: Mode) -> None:
        check_batch_size("samples", len(samples), self.settings.max_batch_size)
        if mode not in self.backend.capabilities:
            supported = ", ".join(m.value for m in self.backend.capabilities)
            raise InvalidInput(f"mode {mode.value!r} is not supported by {self.backend.name}; supported: {supported}")
        if mode is Mode.GROUP:
            missing = [i for i, s in enumerate(samples) if not s.group_id]
            if missing:
                raise InvalidInput(f"mode 'group' needs a group_id on every sample; missing on samples {missing[:10]}")

    async def score(self, samples: Sequence[Sample], mode: Mode) -> list[Result]:
        self.validate(samples, mode)
        if not self.backend.ready():
            raise NotReady(f"{self.backend.name} is not ready (model loading or upstream down); retry later")
        with self.admission.admit(len(samples)):
            results = await self.backend.score(samples, mode)
        if len(results) != len(samples):  # a backend bug; never answer with misaligned scores
            raise RuntimeError(f"backend returned {len(results)} results for {len(samples)} samples")
        self.metrics.observe_results(results)
        return results
