"""Evaluation runs: the benchmark's prompts out, generated images in, judged as they arrive.

The service serves one or more benchmark sets (`BENCHMARK=test_prompts_en,test_prompts_zh`, named
"en", "zh": the file stem without "test_prompts_"); requests name the set, the first is the default.
A run (one per evaluated training step and set) collects images over any number of submissions; each image is
judged by the UniGenBench judge as soon as it is accepted (bounded by `UNIGENBENCH_WORKERS` calls in
flight over all runs), and `finish` waits for the last judgement, summarises, and writes the run's
CSV and JSON (atomically, before the run is forgotten). StartRun hands out a secret with the run id;
submissions and FinishRun must present it, and without it a run is as unknown as one that never
existed (NOT_FOUND), so one client cannot feed or finish another's run. A run with no client call and
no judgement in flight for RUN_IDLE_TIMEOUT_S expires: what it judged is written, then it is
forgotten. Plain Python: the transports live in `api.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge

from deepgen_common.errors import ImageError, InvalidInput, NotFound, NotReady, Overloaded
from deepgen_common.eval_results import summarize_results, write_results_csv, write_summary_json
from deepgen_common.judge import HealthWatch, JudgeClient, JudgeImage, JudgeRejected, JudgeUnavailable
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.service import check_batch_size
from deepgen_common.types import ImageFormat, ImageResult, Limits, RunSummary, ServiceInfo
from eval_unigenbench import __version__
from eval_unigenbench.answers import JudgeAnswer, parse_answer
from eval_unigenbench.benchmark import Benchmark, BenchmarkItem, load_benchmark
from eval_unigenbench.judge_prompt import Templates, build_judge_prompt, definition_gaps
from eval_unigenbench.settings import EvalSettings

log = logging.getLogger(__name__)

EVAL_API = "deepgen.eval.v1"
MAX_DUPLICATES = 64  # images per prompt a run may ask for (as the DUPLICATES setting)
MAX_STEP = 2**31 - 1  # a training step; bounded so it fits the int64 of the contract and a folder name


@dataclass(frozen=True)
class Submission:
    """One generated image for `duplicate` (0-based) of benchmark prompt `prompt_id`."""

    prompt_id: str
    duplicate: int
    image: bytes
    image_format: ImageFormat = ImageFormat.UNSPECIFIED


@dataclass(frozen=True)
class OpenedRun:
    """What StartRun answers: the run's id and the secret its submissions and FinishRun must present."""

    run_id: str
    secret: str


@dataclass
class _Run:
    run_id: str
    step: int
    benchmark: str
    secret: str
    duplicates: int
    last_activity: float = field(default_factory=time.monotonic)
    judging: dict[tuple[str, int], asyncio.Task[ImageResult]] = field(default_factory=dict)
    finishing: bool = False
    calls: int = 0  # submissions in progress


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
        self.benchmarks: dict[str, Benchmark] = {}
        self._judge_prompts: dict[str, dict[str, str]] = {}  # set -> prompt id -> judge prompt
        self._runs: dict[str, _Run] = {}
        self._expiry: asyncio.Task[None] | None = None
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
            "Evaluation runs ended, by status (finished, expired, abandoned).",
            ["status"],
            registry=metrics.registry,
        )
        metrics.info.info({"name": self.name, "version": self.version, "backend": self.description})

    # lifecycle

    async def load(self) -> None:
        settings = self.settings
        benchmarks: dict[str, Benchmark] = {}
        for set_name, path in settings.benchmark_paths.items():
            benchmark = await asyncio.to_thread(load_benchmark, path)
            if settings.prompt_limit:
                benchmark = Benchmark(benchmark.name, benchmark.language, benchmark.items[: settings.prompt_limit])
            templates = await asyncio.to_thread(Templates.load, settings.templates_dir, benchmark.language)
            gaps = definition_gaps(benchmark.items, templates)
            if any(gaps.values()):
                log.warning(
                    "testpoints without their own definition",
                    extra={"fields": {"benchmark": set_name, **{k: dict(v) for k, v in gaps.items()}}},
                )
            self._judge_prompts[set_name] = {
                item.prompt_id: build_judge_prompt(item, templates) for item in benchmark.items
            }
            benchmarks[set_name] = benchmark
            log.info(
                "benchmark loaded",
                extra={"fields": {"benchmark": set_name, "prompts": len(benchmark.items), "file": str(path)}},
            )
        self.benchmarks = benchmarks
        await self.health.start()
        self._expiry = asyncio.create_task(self._expire_idle_runs(), name="expire-idle-runs")
        if settings.sleep_between_runs and self.health.healthy:
            await self._switch(self.judge, awake=False)

    def ready(self) -> bool:
        return bool(self.benchmarks) and self.health.healthy

    def waiting_for(self) -> dict[str, str]:
        if not self.benchmarks:
            files = ", ".join(str(p) for p in self.settings.benchmark_paths.values())
            return {"benchmark": f"loading {files} and the templates"}
        return self.health.waiting_for()

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
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

    def prompts(self, benchmark: str = "") -> Benchmark:
        """The benchmark set (`""`: the first) whose prompts the trainer generates `settings.duplicates`
        images each for."""
        return self._loaded(benchmark)[1]

    async def start_run(self, step: int, benchmark: str = "", duplicates: int = 0) -> OpenedRun:
        """Open a run of `step` on set `benchmark` (`""`: the first) with `duplicates` images per prompt
        (0: DUPLICATES)."""
        set_name, _ = self._loaded(benchmark)
        self._check_judge()
        if not 0 <= step <= MAX_STEP:
            raise InvalidInput(f"step must be in 0..{MAX_STEP}, got {step}")
        if not 0 <= duplicates <= MAX_DUPLICATES:
            raise InvalidInput(f"duplicates must be in 1..{MAX_DUPLICATES} (0: DUPLICATES), got {duplicates}")
        if len(self._runs) >= self.settings.max_open_runs:
            raise Overloaded(
                f"{len(self._runs)} runs are open (MAX_OPEN_RUNS={self.settings.max_open_runs}); finish one first"
            )
        if not self._runs:
            await self._wake_for_runs()
        run = _Run(
            run_id=secrets.token_hex(8), step=step, benchmark=set_name, secret=secrets.token_urlsafe(32),
            duplicates=duplicates or self.settings.duplicates,
        )  # fmt: skip
        self._runs[run.run_id] = run
        self.open_runs.set(len(self._runs))
        log.info("run started", extra={"fields": {"run_id": run.run_id, "step": step, "benchmark": set_name}})
        return OpenedRun(run.run_id, run.secret)

    async def submit(self, run_id: str, secret: str, images: Sequence[Submission]) -> int:
        """Validate a batch as a whole (nothing is accepted from a bad batch), then start judging its
        images. Waits while MAX_QUEUED_SAMPLES images are waiting for the judge (back-pressure)."""
        run = self._run(run_id, secret)
        run.last_activity = time.monotonic()
        run.calls += 1
        try:
            return await self._submit(run, images)
        finally:
            run.calls -= 1
            run.last_activity = time.monotonic()

    async def _submit(self, run: _Run, images: Sequence[Submission]) -> int:
        benchmark = self.benchmarks[run.benchmark]
        self._check_judge()
        check_batch_size("images", len(images), self.settings.max_batch_size)
        keys: set[tuple[str, int]] = set()
        for i, s in enumerate(images):
            if s.prompt_id not in benchmark.by_id:
                raise InvalidInput(f"images[{i}].prompt_id {s.prompt_id!r} is not a prompt of {benchmark.name}")
            if not 0 <= s.duplicate < run.duplicates:
                raise InvalidInput(
                    f"images[{i}].duplicate is {s.duplicate}; valid: 0..{run.duplicates - 1} (the run's duplicates)"
                )
            key = (s.prompt_id, s.duplicate)
            if key in run.judging or key in keys:
                raise InvalidInput(f"images[{i}]: prompt {s.prompt_id!r} duplicate {s.duplicate} was already submitted")
            keys.add(key)
        for s in images:
            await self._wait_for_room()
            if run.finishing or run.run_id not in self._runs:  # finished or abandoned while waiting
                self._release()
                raise InvalidInput(f"run {run.run_id} was finished while images were being submitted")
            item = benchmark.by_id[s.prompt_id]
            prompt = self._judge_prompts[run.benchmark][s.prompt_id]
            run.judging[(s.prompt_id, s.duplicate)] = asyncio.create_task(self._judge_image(item, prompt, s))
        return len(images)

    async def finish(self, run_id: str, secret: str) -> RunSummary:
        """Wait for every judgement of the run, then summarise and write its CSV and JSON; the run is
        forgotten only once they are written. If writing fails the run stays open and FinishRun can
        be called again."""
        run = self._run(run_id, secret)
        run.finishing = True
        try:
            results, summary = self._summarize(run, list(await asyncio.gather(*run.judging.values())))
            await asyncio.to_thread(self._write, results, summary, self._folder(run))
        except OSError as exc:
            run.finishing = False
            run.last_activity = time.monotonic()
            raise NotReady(
                f"could not write the results of run {run_id} under RESULTS_DIR ({exc}); "
                "the run stays open: call FinishRun again"
            ) from None
        except BaseException:  # the caller left while judgements were pending: it may finish again
            run.finishing = False
            run.last_activity = time.monotonic()
            raise
        self._forget(run, "finished")
        expected = len(self.benchmarks[run.benchmark].items) * run.duplicates
        if len(results) < expected:
            log.warning(
                "run finished with images missing",
                extra={"fields": {"run_id": run_id, "missing": expected - len(results)}},
            )
        log.info(
            "run finished",
            extra={
                "fields": {
                    "run_id": run_id,
                    "step": run.step,
                    "judged": summary.images_judged,
                    "parse_failures": summary.parse_failures,
                    "errors": summary.errors,
                    "benchmark": run.benchmark,
                    "overall": summary.primary_mean_accuracy,
                    "pooled": summary.overall_accuracy,
                }
            },
        )
        if not self._runs:
            await self._sleep_between_runs()
        return summary

    # judging

    async def _judge_image(self, item: BenchmarkItem, prompt: str, s: Submission) -> ImageResult:
        try:
            return await self._judge(item, prompt, s)
        finally:
            self._release()

    async def _judge(self, item: BenchmarkItem, prompt: str, s: Submission) -> ImageResult:
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
                answer = await self.judge.chat([image], prompt, temperature)
            except (JudgeUnavailable, JudgeRejected) as exc:
                self.judge_calls.labels(result="failed").inc()
                return row("error", scores=None, analysis=None, detail=f"judge call failed: {exc}")
            parsed = parse_answer(answer, len(item.testpoints), self.settings.unigenbench_answer_rules)
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

    def _loaded(self, benchmark: str) -> tuple[str, Benchmark]:
        """(set name, benchmark) of the set `benchmark` names (`""`: the first)."""
        if not self.benchmarks:
            raise NotReady("the benchmark is still loading; retry later")
        set_name = benchmark or next(iter(self.benchmarks))
        if set_name not in self.benchmarks:
            raise InvalidInput(
                f"benchmark {benchmark!r} is not served; valid: {', '.join(self.benchmarks)} (BENCHMARK lists them)"
            )
        return set_name, self.benchmarks[set_name]

    def _check_judge(self) -> None:
        if not self.health.healthy:
            raise NotReady(f"the judge at {self.judge.root_url} is not answering /health; retry later")

    def _run(self, run_id: str, secret: str) -> _Run:
        run = self._runs.get(run_id)
        # A wrong secret is answered as an unknown run: it tells a stranger nothing about open runs.
        if run is None or not secrets.compare_digest(run.secret.encode(), secret.encode()):
            raise NotFound(
                f"run {run_id!r} is not open (never started, finished or expired) or its run secret is wrong; "
                "present the run_secret StartRun returned, or call StartRun"
            )
        if run.finishing:
            raise InvalidInput(f"run {run_id} is finishing; start a new run")
        return run

    def _summarize(self, run: _Run, results: list[ImageResult]) -> tuple[list[ImageResult], RunSummary]:
        order = {item.prompt_id: i for i, item in enumerate(self.benchmarks[run.benchmark].items)}
        results.sort(key=lambda r: (order[r.prompt_id], r.duplicate))
        summary = summarize_results(
            run.run_id, run.step, results, answer_rules=self.settings.unigenbench_answer_rules, benchmark=run.benchmark
        )
        return results, summary

    async def _expire_idle_runs(self) -> None:
        """Every half RUN_IDLE_TIMEOUT_S (at most every 30 s): write what each idle run judged, then
        forget it."""
        timeout = self.settings.run_idle_timeout_s
        while True:
            await asyncio.sleep(min(timeout / 2, 30.0))
            expired = 0
            for run in [r for r in self._runs.values() if self._idle(r)]:
                judged = [t.result() for t in run.judging.values() if not t.cancelled() and t.exception() is None]
                results, summary = self._summarize(run, judged)
                try:
                    if results:
                        await asyncio.to_thread(self._write, results, summary, self._folder(run, expired=True))
                except OSError:
                    log.exception("could not write an expired run's results", extra={"fields": {"run_id": run.run_id}})
                if self._runs.get(run.run_id) is run and self._idle(run):  # no client came back meanwhile
                    self._abandon(run, f"idle for over {timeout:g} s (RUN_IDLE_TIMEOUT_S)", status="expired")
                    expired += 1
            if expired and not self._runs:
                await self._sleep_between_runs()

    def _idle(self, run: _Run) -> bool:
        """No client call in progress, no judgement in flight, and no client call for RUN_IDLE_TIMEOUT_S."""
        busy = run.finishing or run.calls > 0 or any(not t.done() for t in run.judging.values())
        return not busy and time.monotonic() - run.last_activity > self.settings.run_idle_timeout_s

    def _forget(self, run: _Run, status: str) -> None:
        self._runs.pop(run.run_id, None)
        self.open_runs.set(len(self._runs))
        self.runs_total.labels(status=status).inc()

    def _abandon(self, run: _Run, reason: str, status: str = "abandoned") -> None:
        for task in run.judging.values():
            task.cancel()
        self._forget(run, status)
        log.warning("run abandoned", extra={"fields": {"run_id": run.run_id, "step": run.step, "reason": reason}})

    def _folder(self, run: _Run, expired: bool = False) -> Path:
        name = f"step-{run.step:07d}-{run.run_id}"
        return self.settings.results_dir / (f"{name}-expired" if expired else name)

    @staticmethod
    def _write(results: list[ImageResult], summary: RunSummary, folder: Path) -> None:
        """Write results.csv and summary.json into a hidden sibling folder, then rename it into place:
        the run's folder appears whole or not at all."""
        partial = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            write_results_csv(partial / "results.csv", results)
            write_summary_json(partial / "summary.json", summary)
            partial.rename(folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

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
