"""The OCR reward backend: a pool of OCR engines (worker processes or threads) scoring one image
per task, so every core is busy while the event loop keeps serving requests."""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
from PIL import Image

from deepgen_common.errors import ImageError
from deepgen_common.images import decode_image
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.types import ImageFormat, Mode, Result, Sample
from reward_ocr import __version__
from reward_ocr.engines import EngineName, OcrEngine, create_engine
from reward_ocr.scoring import ScoringConfig, quoted_spans, score_text
from reward_ocr.settings import OcrSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; sent once to each worker process."""

    engine: EngineName
    threads: int
    use_gpu: bool
    scoring: ScoringConfig
    max_image_bytes: int
    max_image_pixels: int

    @classmethod
    def from_settings(cls, s: OcrSettings) -> WorkerConfig:
        return cls(s.ocr_backend, s.ocr_threads, s.ocr_use_gpu, s.scoring, s.max_image_bytes, s.max_image_pixels)


@dataclass(frozen=True)
class Scored:
    result: Result
    started_at: float  # time.time() when a worker picked the task up
    stages: dict[str, float]  # seconds per stage: decode, infer, score


class OcrWorker:
    """One OCR engine and the scoring rules; scores one sample at a time."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.engine: OcrEngine = create_engine(config.engine, config.threads, config.use_gpu)
        self.engine.read(np.full((48, 320, 3), 255, np.uint8))  # engines load models lazily: do it now

    def score(self, image: bytes, image_format: ImageFormat, prompt: str) -> Scored:
        started = time.time()
        if not any(s.strip() for s in quoted_spans(prompt)):  # nothing to read: skip the OCR entirely
            return Scored(Result.not_applicable(), started, {})
        t0 = time.perf_counter()
        try:
            rgb = np.asarray(
                decode_image(
                    image, image_format, max_bytes=self.config.max_image_bytes, max_pixels=self.config.max_image_pixels
                )
            )
        except ImageError as exc:
            return Scored(Result.failed(str(exc)), started, {"decode": time.perf_counter() - t0})
        t1 = time.perf_counter()
        try:
            tokens = self.engine.read(rgb)
        except Exception as exc:  # an engine failure on one image must not fail the batch
            log.exception("OCR engine failed on one image")
            return Scored(Result.failed(f"OCR engine failed: {type(exc).__name__}"), started, {})
        t2 = time.perf_counter()
        score = score_text(prompt, tokens, self.config.scoring)
        t3 = time.perf_counter()
        text = " ".join(t.text for t in tokens)
        result = Result.not_applicable() if score is None else Result.ok(score, ocr_text=text)
        return Scored(result, started, {"decode": t1 - t0, "infer": t2 - t1, "score": t3 - t2})


# Worker processes keep their engine in a module global (set by the pool initializer); worker
# threads keep one per thread, since PaddleOCR is not thread-safe.
_process_worker: OcrWorker | None = None
_thread_workers = threading.local()


def _init_process(config: WorkerConfig) -> None:
    global _process_worker
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the pool; OpenCV threads would oversubscribe cores
    _process_worker = OcrWorker(config)


def _score_in_process(image: bytes, image_format: ImageFormat, prompt: str) -> Scored:
    assert _process_worker is not None, "pool initializer did not run"
    return _process_worker.score(image, image_format, prompt)


def _init_thread(config: WorkerConfig) -> None:
    _thread_workers.worker = OcrWorker(config)


def _score_in_thread(image: bytes, image_format: ImageFormat, prompt: str) -> Scored:
    return _thread_workers.worker.score(image, image_format, prompt)


class OcrBackend:
    """reward-ocr's backend: pointwise scoring on a pool of `ocr_workers` engines."""

    name = "reward-ocr"
    version = __version__
    capabilities = (Mode.POINTWISE,)

    def __init__(self, settings: OcrSettings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.description = (
            f"{settings.ocr_backend} ({settings.ocr_workers} {settings.ocr_executor} workers "
            f"x {settings.ocr_threads} threads)"
        )
        self._config = WorkerConfig.from_settings(settings)
        self._pool: Executor | None = None
        self._task = _score_in_process if settings.ocr_executor == "process" else _score_in_thread
        self._ready = False

    def _new_pool(self) -> Executor:
        n = self.settings.ocr_workers
        if self.settings.ocr_executor == "process":
            # spawn, not fork: the parent runs gRPC threads, which must not be forked.
            return ProcessPoolExecutor(
                n, mp_context=multiprocessing.get_context("spawn"), initializer=_init_process, initargs=(self._config,)
            )
        return ThreadPoolExecutor(n, thread_name_prefix="ocr", initializer=_init_thread, initargs=(self._config,))

    async def load(self) -> None:
        self._pool = self._new_pool()
        loop = asyncio.get_running_loop()
        # One task per worker: pools start workers on demand, so this starts (and warms) all of them.
        blank = _blank_png()
        await asyncio.gather(
            *(
                loop.run_in_executor(self._pool, self._task, blank, ImageFormat.PNG, '"x"')
                for _ in range(self.settings.ocr_workers)
            )
        )
        self._ready = True

    def ready(self) -> bool:
        return self._ready

    def waiting_for(self) -> dict[str, str]:
        if self._ready:
            return {}
        return {"ocr_workers": f"starting {self.settings.ocr_workers} {self.settings.ocr_backend} workers"}

    async def score(self, samples: Sequence[Sample], mode: Mode) -> list[Result]:
        assert self._pool is not None, "score() before load()"
        loop = asyncio.get_running_loop()
        submitted = time.time()
        pool = self._pool
        try:
            scored = await asyncio.gather(
                *(loop.run_in_executor(pool, self._task, s.image, s.image_format, s.prompt) for s in samples)
            )
        except BrokenProcessPool:
            log.error("an OCR worker process died; restarting the pool")
            await self._restart(pool)
            return [Result.failed("OCR worker process crashed while scoring this batch; retry")] * len(samples)
        if self.metrics is not None:
            for s in scored:
                self.metrics.observe_stage("queue", max(0.0, s.started_at - submitted))
                for stage, seconds in s.stages.items():
                    self.metrics.observe_stage(stage, seconds)
        return [s.result for s in scored]

    async def _restart(self, broken: Executor) -> None:
        if self._pool is not broken:  # another request already restarted it
            return
        self._ready = False
        broken.shutdown(wait=False, cancel_futures=True)
        await self.load()

    async def close(self) -> None:
        self._ready = False
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _blank_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), "white").save(buffer, format="PNG")
    return buffer.getvalue()
