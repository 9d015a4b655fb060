"""reward-unified's backend: fans every pair of every group out to the judge (bounded), parses the
verdicts and answers per-image win rates."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence

import prometheus_client

from deepgen_common.errors import ImageError, InvalidInput
from deepgen_common.judge import HealthWatch, JudgeImage, JudgeRejected, JudgeUnavailable
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.types import Mode, Result, Sample
from reward_unified import __version__
from reward_unified.settings import UnifiedSettings
from reward_unified.templates import Templates, fill
from reward_unified.verdicts import Comparison, Winner, comparisons, parse_pairwise, parse_pointwise, tally

log = logging.getLogger(__name__)


class UnifiedBackend:
    """Group mode: reward = wins / comparisons within the sample's group (ties count half).
    Pointwise mode: mean of the judge's Alignment / Coherence / Style scores (1-5)."""

    name = "reward-unified"
    version = __version__
    capabilities = (Mode.GROUP, Mode.POINTWISE)

    def __init__(self, settings: UnifiedSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.description = f"vllm:{settings.judge_model}"
        self.workers = settings.workers  # judge calls in flight at once
        self.judge = settings.judge_client(on_latency=self._observe_call)
        self._call_seconds: float | None = None  # recent seconds of one judge call
        self.health = HealthWatch(self.judge, settings.judge_health_poll_s)
        self.judge_calls = prometheus_client.Counter(
            "deepgen_judge_calls",
            "Judge calls by result (ok, tie, unparseable, failed).",
            ["result"],
            registry=metrics.registry,
        )
        self.templates: Templates | None = None

    def _observe_call(self, seconds: float) -> None:
        self.metrics.observe_stage("judge", seconds)
        previous = self._call_seconds
        self._call_seconds = seconds if previous is None else previous + 0.1 * (seconds - previous)

    def _observe_samples(self, n: int, calls: int) -> None:
        """Report each sample's share of the request's judge calls to admission."""
        if self._call_seconds is not None:
            for _ in range(n):
                self.metrics.observe_sample_seconds(calls * self._call_seconds / n)

    async def load(self) -> None:
        self.templates = Templates.load(self.settings.templates_dir)
        await self.health.start()

    def ready(self) -> bool:
        return self.templates is not None and self.health.healthy

    async def score(self, samples: Sequence[Sample], mode: Mode) -> list[Result]:
        if mode is Mode.GROUP:
            self._check_group_sizes(samples)
        images = await asyncio.gather(*(asyncio.to_thread(self._validate, s) for s in samples))
        if mode is Mode.GROUP:
            return await self._score_groups(samples, images)
        results = await asyncio.gather(*(self._score_one(s, im) for s, im in zip(samples, images, strict=True)))
        self._observe_samples(len(samples), len(samples))
        return results

    def _check_group_sizes(self, samples: Sequence[Sample]) -> None:
        """Refuse the whole request before any judge call when a group is over MAX_GROUP_SIZE: a group
        of n costs n(n-1)/2 calls (64 images: 2,016), so one request could hold the judge for hours."""
        sizes = Counter(s.group_id for s in samples)
        group_id, size = sizes.most_common(1)[0]
        limit = self.settings.max_group_size
        if size > limit:
            raise InvalidInput(
                f"group {group_id!r} has {size} samples, over the limit of {limit} (MAX_GROUP_SIZE); "
                f"send groups of at most {limit} images"
            )

    def _validate(self, sample: Sample) -> JudgeImage | str:
        """The image to send, or the reason it cannot be used. The judge decodes it, so only the
        header, the limits and the structure are checked here (no pixel decode on the hot path)."""
        limits = {"max_bytes": self.settings.max_image_bytes, "max_pixels": self.settings.max_image_pixels}
        try:
            return JudgeImage.checked(sample.image, sample.image_format, **limits)
        except ImageError as exc:
            return str(exc)

    async def _score_groups(self, samples: Sequence[Sample], images: list[JudgeImage | str]) -> list[Result]:
        assert self.templates is not None
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            if isinstance(images[i], JudgeImage):
                groups.setdefault(s.group_id, []).append(i)
        failures: dict[int, str] = {}

        async def judge(c: Comparison) -> tuple[Comparison, Winner | None]:
            pair = [images[c.first], images[c.second]]
            try:
                answer = await self.judge.chat(pair, fill(self.templates.pairwise, samples[c.first].prompt))  # type: ignore[arg-type, union-attr]
            except (JudgeUnavailable, JudgeRejected) as exc:
                self.judge_calls.labels(result="failed").inc()
                failures[c.first] = failures[c.second] = f"judge call failed: {exc}"
                return c, None
            winner = parse_pairwise(answer)
            self.judge_calls.labels(result="ok" if winner else "tie").inc()
            if winner is None:
                log.info("unparseable verdict counted as a tie", extra={"fields": {"answer": answer[-300:]}})
            return c, winner

        pairs = comparisons(list(groups.values()), self.settings.both_orders)
        judged = await asyncio.gather(*(judge(c) for c in pairs))
        self._observe_samples(len(samples), len(pairs))
        tallies = tally(
            len(samples), [(c, w) for c, w in judged if c.first not in failures and c.second not in failures]
        )
        results = []
        for i, image in enumerate(images):
            if isinstance(image, str):
                results.append(Result.failed(image))
            elif i in failures:  # never a silent tie: an unreachable judge is an error
                results.append(Result.failed(failures[i]))
            elif (rate := tallies[i].win_rate) is None:
                results.append(Result.not_applicable(reason="no other valid image in the group to compare with"))
            else:
                results.append(Result.ok(rate, comparisons=str(tallies[i].played), ties=str(tallies[i].ties)))
        return results

    async def _score_one(self, sample: Sample, image: JudgeImage | str) -> Result:
        assert self.templates is not None
        if isinstance(image, str):
            return Result.failed(image)
        try:
            answer = await self.judge.chat([image], fill(self.templates.pointwise, sample.prompt))
        except (JudgeUnavailable, JudgeRejected) as exc:
            self.judge_calls.labels(result="failed").inc()
            return Result.failed(f"judge call failed: {exc}")
        scores = parse_pointwise(answer)
        if scores is None:
            self.judge_calls.labels(result="unparseable").inc()
            return Result.failed(f"judge answer has no Alignment / Coherence / Style scores: {answer[-200:]!r}")
        self.judge_calls.labels(result="ok").inc()
        return Result.ok(sum(scores.values()) / len(scores), **{k: f"{v:g}" for k, v in scores.items()})

    async def close(self) -> None:
        await self.health.stop()
        await self.judge.close()
