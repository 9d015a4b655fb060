"""The transport-independent request path of a reward service: validate, admit by time, score, count.

A backend is plain Python (KServe style): `load()` once, `ready()` as a flag, `score()` per request.
Both transports (gRPC and HTTP) call `RewardService.score`, so limits and metrics are enforced once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from deepgen_common.admission import Admission
from deepgen_common.api import Lifecycle
from deepgen_common.deadline import remaining_s
from deepgen_common.errors import InvalidInput, NotReady
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.settings import ServiceSettings
from deepgen_common.types import Mode, Result, Sample, ServiceInfo

log = logging.getLogger(__name__)

REWARD_API = "deepgen.reward.v1"


class Backend(Lifecycle, Protocol):
    """What a reward service implements; everything else comes from the kit.

    For admission by time a backend states `workers` (samples it works on at once now: live pool
    workers, judge calls in flight; read at every admission check) and reports each sample's worker
    time with `metrics.observe_sample_seconds`.
    `score` runs in the request's task: when the client leaves (cancelled, deadline passed, connection
    closed) that task is cancelled, so work the backend awaits (executor futures, HTTP calls) and has
    not started is dropped; `deepgen_common.deadline.remaining_s()` gives the time left.
    """

    capabilities: tuple[Mode, ...]
    workers: int

    async def score(self, samples: Sequence[Sample], mode: Mode) -> list[Result]:
        """One result per sample, in order. Per-sample problems are ERROR results, not exceptions."""


def check_batch_size(field: str, n: int, limit: int) -> None:
    """A request's batch must hold 1..MAX_BATCH_SIZE items; raises InvalidInput naming `field`."""
    if n == 0:
        raise InvalidInput(f"{field} is empty: send at least one item")
    if n > limit:
        raise InvalidInput(f"{field} has {n} entries, over the limit of {limit} (MAX_BATCH_SIZE); split the batch")


class RewardService:
    """Validates requests against the limits, admits them to the bounded queue and scores them."""

    def __init__(self, backend: Backend, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics
        self.admission = Admission(
            lambda: backend.workers, settings.max_queued_samples, settings.max_queue_wait_s, metrics
        )
        metrics.workers.set_function(lambda: backend.workers)
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

    def _check_ready(self) -> None:
        if not self.backend.ready():
            waiting = "; ".join(f"{k}: {v}" for k, v in self.backend.waiting_for().items())
            raise NotReady(
                f"{self.backend.name} is not ready ({waiting or 'loading'}); retry later or on another replica"
            )

    async def score(self, samples: Sequence[Sample], mode: Mode) -> list[Result]:
        self.validate(samples, mode)
        self._check_ready()
        with self.admission.admit(len(samples), remaining_s()):
            results = await self.backend.score(samples, mode)
        if len(results) != len(samples):  # a backend bug; never answer with misaligned scores
            raise RuntimeError(f"backend returned {len(results)} results for {len(samples)} samples")
        self.metrics.observe_results(results)
        return results
