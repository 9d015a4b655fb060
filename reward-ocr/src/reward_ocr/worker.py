"""One OCR worker: an engine plus the scoring rules, scoring one sample at a time.

A worker lives in its own process (the default: `serve` is the process's main loop, fed over a pipe)
or in a thread of the service process; `reward_ocr.pool` runs several and replaces stuck ones.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np

from deepgen_common.errors import ImageError
from deepgen_common.images import decode_image
from deepgen_common.types import ImageFormat, Result
from reward_ocr.engines import EngineName, OcrEngine, create_engine
from reward_ocr.scoring import ScoringConfig, score_text

log = logging.getLogger(__name__)

READY = "ready"  # a worker process's first message: its engine is loaded


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; sent once to each worker process."""

    engine: EngineName
    threads: int
    use_gpu: bool
    scoring: ScoringConfig
    max_image_bytes: int
    max_image_pixels: int


@dataclass(frozen=True)
class LoadFailed:
    """A worker process's first message when its engine could not load, before it exits."""

    error: str  # the exception's type and text


@dataclass(frozen=True)
class Task:
    """One sample to score: encoded image, its declared format and the prompt."""

    image: bytes
    image_format: ImageFormat
    prompt: str


@dataclass(frozen=True)
class Scored:
    result: Result
    stages: dict[str, float]  # seconds per stage: decode, infer, score


class OcrWorker:
    """One OCR engine and the scoring rules; scores one sample at a time."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.engine: OcrEngine = create_engine(config.engine, config.threads, config.use_gpu)
        self.engine.read(np.full((48, 320, 3), 255, np.uint8))  # engines load models lazily: do it now

    def score(self, task: Task) -> Scored:
        t0 = time.perf_counter()
        try:
            rgb = np.asarray(
                decode_image(
                    task.image,
                    task.image_format,
                    max_bytes=self.config.max_image_bytes,
                    max_pixels=self.config.max_image_pixels,
                )
            )
        except ImageError as exc:
            return Scored(Result.failed(str(exc)), {"decode": time.perf_counter() - t0})
        t1 = time.perf_counter()
        try:
            tokens = self.engine.read(rgb)
        except Exception as exc:  # an engine failure on one image must not fail the batch
            log.exception("OCR engine failed on one image")
            return Scored(Result.failed(f"OCR engine failed: {type(exc).__name__}"), {})
        t2 = time.perf_counter()
        score = score_text(task.prompt, tokens, self.config.scoring)
        t3 = time.perf_counter()
        text = " ".join(t.text for t in tokens)
        result = Result.not_applicable() if score is None else Result.ok(score, ocr_text=text)
        return Scored(result, {"decode": t1 - t0, "infer": t2 - t1, "score": t3 - t2})


def serve(conn: Connection, config: WorkerConfig) -> None:
    """Main loop of a worker process: load the engine, say READY (or LoadFailed, and exit), then answer
    each Task with a Scored until the service closes its end of the pipe."""
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from the pool; OpenCV threads would oversubscribe cores
    try:
        worker = OcrWorker(config)
    except Exception as exc:  # the service logs the reason and tries again later
        conn.send(LoadFailed(f"{type(exc).__name__}: {exc}"))
        raise
    conn.send(READY)
    while True:
        try:
            task = conn.recv()
            conn.send(worker.score(task))
        except (EOFError, BrokenPipeError):  # the service closed the pipe (shutdown) or died
            return
