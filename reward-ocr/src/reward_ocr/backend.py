"""The OCR reward backend: checks each sample's prompt, then scores the samples that quote text on a
pool of OCR workers (`reward_ocr.pool`), so every core is busy while the event loop keeps serving."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Sequence

from PIL import Image

from deepgen_common.metrics import ServiceMetrics
from deepgen_common.types import ImageFormat, Mode, Result, Sample
from reward_ocr import __version__
from reward_ocr.pool import WorkerPool
from reward_ocr.scoring import quoted_spans
from reward_ocr.settings import OcrSettings
from reward_ocr.worker import Task, WorkerConfig

log = logging.getLogger(__name__)


class OcrBackend:
    """reward-ocr's backend: pointwise scoring on a pool of `ocr_workers` engines."""

    name = "reward-ocr"
    version = __version__
    capabilities = (Mode.POINTWISE,)

    def __init__(self, settings: OcrSettings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        config = WorkerConfig(
            settings.ocr_backend,
            settings.ocr_threads,
            settings.ocr_use_gpu,
            settings.scoring,
            settings.max_image_bytes,
            settings.max_image_pixels,
        )
        self.pool = WorkerPool(config, settings.ocr_executor, settings.ocr_workers, settings.ocr_sample_timeout_s)
        self._ready = False

    @property
    def description(self) -> str:
        """The engine and the pool, with how many workers are live when some fail to start."""
        s, live = self.settings, self.pool.live
        workers = f"{s.ocr_workers}" if live == s.ocr_workers else f"{live} of {s.ocr_workers} live"
        return f"{s.ocr_backend} ({workers} {s.ocr_executor} workers x {s.ocr_threads} threads)"

    @property
    def workers(self) -> int:
        """Samples scored at once: the live workers (admission divides the queue by them)."""
        return self.pool.live

    async def load(self) -> None:
        await self.pool.start()
        # One sample per worker: the first OCR call of an engine is slower than the rest.
        await asyncio.gather(
            *(self.pool.score(Task(_blank_png(), ImageFormat.PNG, '"x"')) for _ in range(self.settings.ocr_workers))
        )
        self._ready = True

    def ready(self) -> bool:
        """Loaded, and at least one worker live."""
        return self._ready and self.pool.live > 0

    def waiting_for(self) -> dict[str, str]:
        if not self._ready:
            return {"ocr_workers": f"starting {self.settings.ocr_workers} {self.settings.ocr_backend} workers"}
        if self.pool.live == 0:
            return {
                "ocr_workers": f"no worker is live: all {self.settings.ocr_workers} fail to start "
                f"({self.pool.start_error}); retrying with back-off"
            }
        return {}

    async def score(self, samples: Sequence[Sample], mode: Mode) -> list[Result]:
        return list(await asyncio.gather(*(self._score_one(s) for s in samples)))

    async def _score_one(self, sample: Sample) -> Result:
        limit = self.settings.max_prompt_chars
        if len(sample.prompt) > limit:
            return Result.failed(
                f"prompt is {len(sample.prompt)} characters, over the limit of {limit} (MAX_PROMPT_CHARS)"
            )
        if not any(s.strip() for s in quoted_spans(sample.prompt)):  # nothing to read: skip the OCR
            return Result.not_applicable()
        done = await self.pool.score(Task(sample.image, sample.image_format, sample.prompt))
        if self.metrics is not None:
            self.metrics.observe_sample_seconds(sum(done.scored.stages.values()))
            self.metrics.observe_stage("queue", done.queue_s)
            for stage, seconds in done.scored.stages.items():
                self.metrics.observe_stage(stage, seconds)
        return done.scored.result

    async def close(self) -> None:
        self._ready = False
        await self.pool.close()


def _blank_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), "white").save(buffer, format="PNG")
    return buffer.getvalue()
