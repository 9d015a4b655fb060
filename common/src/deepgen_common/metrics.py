"""Prometheus metrics with the same names in every service (one registry per service instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from deepgen_common.types import Outcome, Result

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Weight of the newest sample in the recent per-sample service time: about the last 10 samples count.
_SERVICE_TIME_WEIGHT = 0.1


class ServiceMetrics:
    """Request, stage, batch, outcome, queue and in-flight metrics of one service."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "deepgen_requests",
            "Requests answered, by transport, method and status code.",
            ["transport", "method", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "deepgen_request_seconds",
            "Request latency from receipt to answer.",
            ["transport", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "deepgen_stage_seconds",
            "Per-sample latency of each processing stage (queue, decode, infer, score).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "deepgen_batch_size",
            "Samples per scoring request.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.sample_service_seconds = Gauge(
            "deepgen_sample_service_seconds",
            "Recent worker time per sample (moving average) that admission predicts waits with.",
            registry=r,
        )
        self.sample_seconds: float | None = None  # None until the backend reported a sample
        self.workers = Gauge(
            "deepgen_workers_live",
            "Samples the backend works on at once now (live OCR workers, judge calls in flight); "
            "admission divides the queue by it.",
            registry=r,
        )
        self.items = Counter("deepgen_items", "Samples answered, by outcome.", ["outcome"], registry=r)
        self.queue_depth = Gauge("deepgen_queue_depth", "Samples admitted and not yet answered.", registry=r)
        self.in_flight = Gauge("deepgen_in_flight_requests", "Requests being processed.", registry=r)
        self.info = Info("deepgen_service", "Name, version and backend of the service.", registry=r)
        for outcome in Outcome:  # export every outcome from the start so rates are defined
            self.items.labels(outcome=outcome.value)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(seconds)

    def observe_sample_seconds(self, seconds: float) -> None:
        """A backend reports the worker time one sample took (decode + inference + scoring, or its share
        of the judge calls); admission divides the queue by the service's workers with it."""
        previous = self.sample_seconds
        self.sample_seconds = seconds if previous is None else previous + _SERVICE_TIME_WEIGHT * (seconds - previous)
        self.sample_service_seconds.set(self.sample_seconds)

    def observe_results(self, results: list[Result]) -> None:
        self.batch_size.observe(len(results))
        for result in results:
            self.items.labels(outcome=result.outcome.value).inc()

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
