"""The OCR worker pool with real RapidOCR workers: the time budget per sample, worker replacement, and
workers that cannot start (restarted with back-off, out of the live count meanwhile)."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
from dataclasses import replace

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
# An engine whose package is missing fails to load, as a broken image or memory pressure would make
# the real one fail: swapping the pool's config to it makes the next worker start fail on demand.
BROKEN = replace(CONFIG, engine="paddleocr")
needs_broken_engine = pytest.mark.skipif(
    importlib.util.find_spec("paddleocr") is not None, reason="paddleocr is installed: its engine would load"
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
            [worker] = pool._running.values()
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


async def wait_for(condition, timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


def start_failures(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [r.fields for r in caplog.records if r.getMessage() == "OCR worker failed to start"]


@needs_broken_engine
@pytest.mark.parametrize("executor", ["process", "thread"])
def test_a_worker_that_cannot_start_is_retried_with_back_off_and_counted_out_meanwhile(
    executor: str, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="reward_ocr.pool")

    async def scenario() -> None:
        pool = WorkerPool(CONFIG, executor, 2, sample_timeout_s=0.1, restart_delay_s=0.05, max_restart_delay_s=0.2)
        await pool.start()
        try:
            pool.config = BROKEN
            stuck = await pool.score(DENSE)  # over its budget: its worker is replaced, and cannot start
            assert stuck.scored.result.outcome is Outcome.ERROR
            await wait_for(lambda: len(start_failures(caplog)) >= 5)
            assert pool.live == 1  # the other worker still serves
            failures = start_failures(caplog)
            # Tried at once, then after 0.05, 0.1, 0.2, 0.2 s: doubling up to the cap.
            assert [f["retry_in_s"] for f in failures[:5]] == [0.05, 0.1, 0.2, 0.2, 0.2]
            assert [f["attempt"] for f in failures[:5]] == [1, 2, 3, 4, 5]
            assert "ModuleNotFoundError: No module named 'paddleocr'" in failures[0]["error"]
            assert failures[0]["live"] == 1
            pool.sample_timeout_s = 60.0
            assert (await pool.score(SMALL)).scored.result.outcome is Outcome.OK  # on the live worker

            pool.config = CONFIG  # the engine loads again: the worker comes back
            await wait_for(lambda: pool.live == 2)
            started = [r.fields for r in caplog.records if r.getMessage() == "OCR worker started"]
            assert started[-1]["live"] == 2
            assert started[-1]["attempts"] > 5

            # After a success the back-off starts over from its first wait.
            caplog.clear()
            pool.config, pool.sample_timeout_s = BROKEN, 0.1
            await pool.score(DENSE)
            await wait_for(lambda: len(start_failures(caplog)) >= 2)
            assert [f["retry_in_s"] for f in start_failures(caplog)[:2]] == [0.05, 0.1]
        finally:
            await pool.close()

    asyncio.run(scenario())


@needs_broken_engine
@pytest.mark.parametrize("executor", ["process", "thread"])
def test_while_no_worker_is_live_samples_end_as_errors_instead_of_waiting(
    executor: str, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="reward_ocr.pool")

    async def scenario() -> None:
        pool = WorkerPool(CONFIG, executor, 1, sample_timeout_s=0.1, restart_delay_s=0.05, max_restart_delay_s=0.2)
        await pool.start()
        try:
            pool.config = BROKEN
            stuck = asyncio.create_task(pool.score(DENSE))
            queued = [asyncio.create_task(pool.score(SMALL)) for _ in range(3)]  # behind the stuck one
            assert (await stuck).scored.result.outcome is Outcome.ERROR
            # Its worker cannot start: the queued samples end at once, with the reason.
            for done in await asyncio.gather(*queued):
                assert done.scored.result.outcome is Outcome.ERROR
                assert "no OCR worker is running" in done.scored.result.error
                assert "ModuleNotFoundError: No module named 'paddleocr'" in done.scored.result.error
            assert pool.live == 0
            late = await pool.score(SMALL)  # and so does one sent meanwhile
            assert "no OCR worker is running" in late.scored.result.error
            assert any(r.getMessage().startswith("no OCR worker is live") for r in caplog.records)

            pool.config = CONFIG
            await wait_for(lambda: pool.live == 1)
            pool.sample_timeout_s = 60.0
            assert (await pool.score(SMALL)).scored.result.outcome is Outcome.OK
        finally:
            await pool.close()

    asyncio.run(scenario())
