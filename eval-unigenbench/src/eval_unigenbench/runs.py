"""Evaluation runs: the benchmark's prompts out, generated images in, judged as they arrive.

A run (one per evaluated training step) collects images over any number of submissions; each image is
judged by the UniGenBench judge as soon as it is accepted (bounded by `UNIGENBENCH_WORKERS` calls in
flight over all runs), and `finish` waits for the last judgement, summarises, and writes the run's
CSV and JSON. Plain Python: the transports live in `api.py`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from deepgen_common.errors import ImageError, InvalidInput, NotFound, NotReady, Overloaded
from deepgen_common.judge import HealthWatch, JudgeClient, JudgeImage, JudgeRejected, JudgeUnavailable
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.service import check_batch_size
from deepgen_common.types import ImageFormat, Limits, ServiceInfo
from eval_unigenbench import __version__
from eval_unigenbench.answers import JudgeAnswer, parse_answer
from eval_unigenbench.benchmark import Benchmark, BenchmarkItem, load_benchmark
from eval_unigenbench.judge_prompt import Templates, build_judge_prompt, definition_gaps
from eval_unigenbench.settings import EvalSettings
from eval_unigenbench.summary import ImageResult, RunSummary, summarize_results, write_results_csv, write_summary_json

log = logging.getLogger(__name__)

EVAL_API = "deepgen.eval.v1"


@dataclass(frozen=True)
class Submission:
    """One generated image for `duplicate` (0-based) of benchmark prompt `prompt_id`."""

    prompt_id: str
    duplicate: int
    image: bytes
    image_format: ImageFormat = ImageFormat.UNSPECIFIED


@dataclass
class _Run:
    run_id: str
    step: int
    last_activity: float = field(default_factory=time.monotonic)
    judging: dict[tuple[str, int], asyncio.Task[ImageResult]] = field(default_factory=dict)
    finishing: bool = False


class UniGenBenchEval:
    """The eval-unigenbench service: benchmark, open runs, judge calls and summaries."""

    name = "eval-unigenbench"
    version = __version__

    def __init__(self, settings: EvalSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.description = f"vllm:{settings.judge_model}"
        self.judge = settings.judge_client(on_latency=lambda seconds: metrics.observe_stage("judge", seconds))
        self.health = HealthWatch(self.judge, settings.judge_health_poll_s)
        self.peer = JudgeClient(settings.peer_judge_url, settings.peer_judge_model) if settings.peer_judge_url else None
        self.benchmark: Benchmark | None = None
        self._judge_prompts: dict[str, str] = {}
        self._runs: dict[str, _Run] = {}
        # Images accepted and not judged yet, over all runs: bounded, submissions wait for room.
        self._room = asyncio.Semaphore(settings.max_queued_samples)
        self._queued = 0
        self.judge_calls = Counter(
            "deepgen_judge_calls",
            "Judge calls by result (ok, unparseable, failed).",
            ["result"],
            registry=metrics.registry,
        )
        self.open_runs = Gauge("deepgen_eval_open_runs", "Evaluation runs open.", registry=metrics.registry)
        self.runs_total = Counter(
            "deepgen_eval_runs",
            "Evaluation runs ended, by status (finished, abandoned).",
            ["status"],
            registry=metrics.registry,
        )
        metrics.info.info({"name": self.name, "version": self.version, "backend": self.description})

    # lifecycle

    async def load(self) -> None:
        settings = self.settings
        benchmark = await asyncio.to_thread(load_benchmark, settings.benchmark_path)
        if settings.prompt_limit:
            benchmark = Benchmark(benchmark.name, benchmark.language, benchmark.items[: settings.prompt_limit])
        templates = await asyncio.to_thread(Templates.load, settings.templates_dir, benchmark.language)
        gaps = definition_gaps(benchmark.items, templates)
        if any(gaps.values()):
            log.warning(
                "testpoints without their own definition", extra={"fields": {k: dict(v) for k, v in gaps.items()}}
            )
        self._judge_prompts = {item.prompt_id: build_judge_prompt(item, templates) for item in benchmark.items}
        self.benchmark = benchmark
        await self.health.start()
        if settings.sleep_between_runs and self.health.healthy:
            await self._switch(self.judge, awake=False)
        log.info(
            "benchmark loaded",
            extra={
                "fields": {
                    "benchmark": benchmark.name,
                    "prompts": len(benchmark.items),
                    "file": str(settings.benchmark_path),
                }
            },
        )

    def ready(self) -> bool:
        return self.benchmark is not None and self.health.healthy

    def waiting_for(self) -> dict[str, str]:
        if self.benchmark is None:
            return {"benchmark": f"loading {self.settings.benchmark_path} and the templates"}
        return self.health.waiting_for()

    async def close(self) -> None:
        for run in list(self._runs.values()):
            self._abandon(run, "service stopping")
        await self.health.stop()
        await self.judge.close()
        if self.peer is not None:
            await self.peer.close()

    def info(self) -> ServiceInfo:
        return ServiceInfo(
            name=self.name,
            version=self.version,
            api=EVAL_API,
            backend=self.description,
            limits=Limits(
                max_batch_size=self.settings.max_batch_size,
                max_image_bytes=self.settings.max_image_bytes,
                max_image_pixels=self.settings.max_image_pixels,
                max_request_bytes=self.settings.max_request_bytes,
                max_queued_samples=self.settings.max_queued_samples,
            ),
            capabilities=(),
        )

    # the API

    def prompts(self) -> Benchmark:
        """The benchmark whose prompts the trainer generates `settings.duplicates` images each for."""
        return self._loaded()

    async def start_run(self, step: int) -> str:
        self._loaded()
        self._check_judge()
        if step < 0:
            raise InvalidInput(f"step must be >= 0, got {step}")
        if len(self._runs) >= self.settings.max_open_runs:
            self._abandon_idle()
        if len(self._runs) >= self.settings.max_open_runs:
            raise Overloaded(
                f"{len(self._runs)} runs are open (MAX_OPEN_RUNS={self.settings.max_open_runs}); finish one first"
            )
        if not self._runs:
            await self._wake_for_runs()
        run = _Run(run_id=secrets.token_hex(8), step=step)
        self._runs[run.run_id] = run
        self.open_runs.set(len(self._runs))
        log.info("run started", extra={"fields": {"run_id": run.run_id, "step": step}})
        return run.run_id

    async def submit(self, run_id: str, images: Sequence[Submission]) -> int:
        """Validate a batch as a whole (nothing is accepted from a bad batch), then start judging its
        images. Waits while MAX_QUEUED_SAMPLES images are waiting for the judge (back-pressure)."""
        run = self._run(run_id)
        benchmark = self._loaded()
        self._check_judge()
        check_batch_size("images", len(images), self.settings.max_batch_size)
        keys: set[tuple[str, int]] = set()
        for i, s in enumerate(images):
            if s.prompt_id not in benchmark.by_id:
                raise InvalidInput(f"images[{i}].prompt_id {s.prompt_id!r} is not a prompt of {benchmark.name}")
            if not 0 <= s.duplicate < self.settings.duplicates:
                raise InvalidInput(
                    f"images[{i}].duplicate is {s.duplicate}; valid: 0..{self.settings.duplicates - 1} (DUPLICATES)"
                )
            key = (s.prompt_id, s.duplicate)
            if key in run.judging or key in keys:
                raise InvalidInput(f"images[{i}]: prompt {s.prompt_id!r} duplicate {s.duplicate} was already submitted")
            keys.add(key)
        for s in images:
            await self._wait_for_room()
            if run.finishing or run.run_id not in self._runs:  # finished or abandoned while waiting
                self._release()
                raise InvalidInput(f"run {run_id} was finished while images were being submitted")
            item = benchmark.by_id[s.prompt_id]
            run.judging[(s.prompt_id, s.duplicate)] = asyncio.create_task(self._judge_image(item, s))
        run.last_activity = time.monotonic()
        return len(images)

    async def finish(self, run_id: str) -> RunSummary:
        """Wait for every judgement of the run, then summarise and write its CSV and JSON."""
        run = self._run(run_id)
        run.finishing = True
        results = list(await asyncio.gather(*run.judging.values()))
        del self._runs[run_id]
        self.open_runs.set(len(self._runs))
        self.runs_total.labels(status="finished").inc()
        order = {item.prompt_id: i for i, item in enumerate(self._loaded().items)}
        results.sort(key=lambda r: (order[r.prompt_id], r.duplicate))
        summary = summarize_results(run.run_id, run.step, results)
        expected = len(order) * self.settings.duplicates
        if len(results) < expected:
            log.warning(
                "run finished with images missing",
                extra={"fields": {"run_id": run_id, "missing": expected - len(results)}},
            )
        await asyncio.to_thread(self._write, run, results, summary)
        log.info(
            "run finished",
            extra={
                "fields": {
                    "run_id": run_id,
                    "step": run.step,
                    "judged": summary.images_judged,
                    "parse_failures": summary.parse_failures,
                    "errors": summary.errors,
                    "overall_accuracy": summary.overall_accuracy,
                }
            },
        )
        if not self._runs:
            await self._sleep_between_runs()
        return summary

    # judging

    async def _judge_image(self, item: BenchmarkItem, s: Submission) -> ImageResult:
        try:
            return await self._judge(item, s)
        finally:
            self._release()

    async def _judge(self, item: BenchmarkItem, s: Submission) -> ImageResult:
        def row(status: str, **values: object) -> ImageResult:
            self.metrics.items.labels(outcome="OK" if status == "ok" else "ERROR").inc()
            return ImageResult(s.prompt_id, s.duplicate, item.prompt, item.testpoints, status=status, **values)  # type: ignore[arg-type]

        limits = {"max_bytes": self.settings.max_image_bytes, "max_pixels": self.settings.max_image_pixels}
        try:
            image = JudgeImage.checked(s.image, s.image_format, **limits)
        except ImageError as exc:
            return row("error", scores=None, analysis=None, detail=str(exc))
        detail = ""
        for attempt in range(1 + self.settings.parse_retries):
            # At temperature 0 a retry would repeat the same answer; retries sample instead.
            temperature = 0.0 if attempt == 0 else self.settings.retry_temperature
            try:
                answer = await self.judge.chat([image], self._judge_prompts[item.prompt_id], temperature)
            except (JudgeUnavailable, JudgeRejected) as exc:
                self.judge_calls.labels(result="failed").inc()
                return row("error", scores=None, analysis=None, detail=f"judge call failed: {exc}")
            parsed = parse_answer(answer, len(item.testpoints))
            if isinstance(parsed, JudgeAnswer):
                self.judge_calls.labels(result="ok").inc()
                return row("ok", scores=parsed.scores, analysis=parsed.analysis)
            self.judge_calls.labels(result="unparseable").inc()
            detail = f"{parsed.reason}: {parsed.detail}"
            log.info(
                "unparseable judge answer",
                extra={"fields": {"prompt_id": s.prompt_id, "attempt": attempt + 1, "reason": detail}},
            )
        return row("parse_failure", scores=None, analysis=None, detail=detail)

    # queue, runs, files

    async def _wait_for_room(self) -> None:
        await self._room.acquire()
        self._queued += 1
        self.metrics.queue_depth.set(self._queued)

    def _release(self) -> None:
        self._room.release()
        self._queued -= 1
        self.metrics.queue_depth.set(self._queued)

    def _loaded(self) -> Benchmark:
        if self.benchmark is None:
            raise NotReady("the benchmark is still loading; retry later")
        return self.benchmark

    def _check_judge(self) -> None:
        if not self.health.healthy:
            raise NotReady(f"the judge at {self.judge.root_url} is not answering /health; retry later")

    def _run(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} is not open (never started, finished or abandoned); call StartRun")
        if run.finishing:
            raise InvalidInput(f"run {run_id} is finishing; start a new run")
        return run

    def _abandon_idle(self) -> None:
        now = time.monotonic()
        for run in list(self._runs.values()):
            if not run.finishing and now - run.last_activity > self.settings.run_idle_timeout_s:
                self._abandon(run, f"idle for over {self.settings.run_idle_timeout_s:g} s")

    def _abandon(self, run: _Run, reason: str) -> None:
        for task in run.judging.values():
            task.cancel()
        self._runs.pop(run.run_id, None)
        self.open_runs.set(len(self._runs))
        self.runs_total.labels(status="abandoned").inc()
        log.warning("run abandoned", extra={"fields": {"run_id": run.run_id, "step": run.step, "reason": reason}})

    def _write(self, run: _Run, results: list[ImageResult], summary: RunSummary) -> None:
        folder = self.settings.results_dir / f"step-{run.step:07d}-{run.run_id}"
        folder.mkdir(parents=True, exist_ok=True)
        write_results_csv(folder / "results.csv", results)
        write_summary_json(folder / "summary.json", summary)

    # vLLM sleep mode: the judge and a peer sharing its GPUs take turns

    async def _wake_for_runs(self) -> None:
        if self.peer is not None:
            await self._switch(self.peer, awake=False)
        if self.settings.sleep_between_runs and not await self._switch(self.judge, awake=True):
            raise NotReady(f"cannot wake the judge at {self.judge.root_url}; retry later")

    async def _sleep_between_runs(self) -> None:
        if self.settings.sleep_between_runs:
            await self._switch(self.judge, awake=False)
        if self.peer is not None:
            await self._switch(self.peer, awake=True)

    async def _switch(self, client: JudgeClient, awake: bool) -> bool:
        try:
            await (client.wake_up() if awake else client.sleep(level=1))
        except (JudgeUnavailable, JudgeRejected) as exc:
            log.warning(
                "vLLM sleep mode switch failed",
                extra={"fields": {"url": client.root_url, "awake": awake, "error": str(exc)}},
            )
            return False
        log.info("vLLM sleep mode switched", extra={"fields": {"url": client.root_url, "awake": awake}})
        return True
