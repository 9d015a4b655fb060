"""The OCR worker pool with real RapidOCR workers: the time budget per sample and worker replacement."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from deepgen_common.types import ImageFormat, Outcome
from reward_ocr.pool import WorkerPool
from reward_ocr.settings import OcrSettings
from reward_ocr.worker import Task, WorkerConfig
from tests.helpers import render_text

pytestmark = pytest.mark.integration

SETTINGS = OcrSettings(http_port=0, grpc_port=0)
CONFIG = WorkerConfig("rapidocr", 1, False, SETTINGS.scoring, SETTINGS.max_image_bytes, SETTINGS.max_image_pixels)
SMALL = Task(render_text(["OK"], size=(160, 64), font_size=32), ImageFormat.PNG, '"OK"')
# Forty lines of text on 1600x1600 pixels: seconds of OCR, far past the 0.1 s budget below.
DENSE = Task(
    render_text([f"LINE {i} OF DENSE TEXT" for i in range(40)], size=(1600, 1600), font_size=18),
    ImageFormat.PNG,
    '"LINE 1"',
)


@pytest.mark.parametrize("executor", ["process", "thread"])
def test_a_sample_over_its_time_budget_is_an_error_and_its_worker_is_replaced(executor: str):
    async def scenario() -> None:
        pool = WorkerPool(CONFIG, executor, workers=1, sample_timeout_s=0.1)
        await pool.start()
        try:
            stuck = await pool.score(DENSE)
            assert stuck.scored.result.outcome is Outcome.ERROR
            assert "over 0.1 s (OCR_SAMPLE_TIMEOUT_S)" in stuck.scored.result.error
            pool.sample_timeout_s = 60.0  # the replacement serves the next sample within a normal budget
            after = await pool.score(SMALL)
            assert after.scored.result.outcome is Outcome.OK, after.scored.result
            assert pool.replaced == 1
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_worker_process_that_dies_is_replaced():
    async def scenario() -> None:
        pool = WorkerPool(CONFIG, "process", workers=1, sample_timeout_s=60.0)
        await pool.start()
        try:
            [worker] = pool._live.values()
            os.kill(worker.process.pid, signal.SIGKILL)  # as the kernel's OOM killer would
            crashed = await pool.score(SMALL)
            assert crashed.scored.result.outcome is Outcome.ERROR
            assert "OCR worker crashed" in crashed.scored.result.error
            assert (await pool.score(SMALL)).scored.result.outcome is Outcome.OK
            assert pool.replaced == 1
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_cancelled_request_drops_its_queued_samples():
    async def scenario() -> None:
        pool = WorkerPool(CONFIG, "thread", workers=1, sample_timeout_s=60.0)
        await pool.start()
        try:
            busy = asyncio.create_task(pool.score(SMALL))
            gone = asyncio.create_task(pool.score(DENSE))
            await asyncio.sleep(0)  # both queued
            gone.cancel()
            await busy
            await pool.score(SMALL)
            assert pool.started == 2  # the two small samples; the dense one was dropped unstarted
        finally:
            await pool.close()

    asyncio.run(scenario())
