"""Rewards of MR-GRPO: the closed set of reward functions and the scorer that fills the (N, K) matrix.

Rewards (columns of the matrix, in the order the scorer was given them):
- ``clip_sim``: CLIP text-image cosine, in-process on the training device (`deepgen_trainer.rewards.clip_sim`);
- ``ocr``: text rendering accuracy from reward-ocr at ``OCR_URL``, pointwise;
- ``unifiedreward_think``: UnifiedReward-Think win rates from reward-unified at
  ``UNIFIEDREWARD_THINK_URL``, group mode (the service judges the pairs within each group id);
- ``jpeg_compressibility`` / ``jpeg_incompressibility``: the JPEG size of the image, in-process
  (`deepgen_trainer.rewards.jpeg`; the original's simple-mode rewards).

A reward is requested only for the samples whose weight for it is non-zero. Every entry that has no
score is NaN, never 0.0, and a parallel status matrix (`RewardStatus`) says why: not requested, not
applicable (e.g. OCR on a prompt without quoted text), a per-sample error, or a call that failed
entirely (service down after the client's retries, circuit breaker open, deadline). A failed call is
logged and counted and leaves NaN for its samples; it never raises, so one bad minute of a reward
service costs a few NaN entries, not the training run. `reward_metrics` turns a batch into
``reward/<name>/{mean,std,fail_rate,na_rate}``.

Overlap: `RewardScorer.submit` scores one decoded generation micro-batch while the caller generates
the next; remote calls (PNG encoding included) run in a thread pool, in-process rewards run at once
in the caller's thread (they share its device). `RewardScorer.gather` waits for them and reports how
long it blocked (``time/reward``).

Group mode needs whole groups: the service computes win rates among the samples of a group that
arrive in one request, so every group must be complete within one submitted micro-batch. Make
``rollout_micro_batch_size`` a multiple of ``rollout_n`` (the rollout keeps a group's images
together); `gather` raises if a group-mode reward saw one group id in two micro-batches. Within a
micro-batch a group is sent whole when any of its samples has a non-zero weight (a win rate among a
subset of the group would be a different reward); scores are kept only for the non-zero-weight
samples. Groups are one prompt and weights are per dataset, so in practice a group is all-or-nothing.
"""

from __future__ import annotations

import enum
import io
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from deepgen_common.client import RewardClient, RewardServiceError
from deepgen_common.types import ImageFormat, Mode, Outcome, Result, Sample
from deepgen_trainer.rewards import jpeg

log = logging.getLogger(__name__)

RewardName = Literal["clip_sim", "ocr", "unifiedreward_think", "jpeg_compressibility", "jpeg_incompressibility"]
REWARD_NAMES: tuple[str, ...] = get_args(RewardName)
REWARD_URL_ENV = {"ocr": "OCR_URL", "unifiedreward_think": "UNIFIEDREWARD_THINK_URL"}

Images = Tensor | Sequence[Image.Image]
"""uint8 (N, H, W, 3) RGB tensor (any device), or a sequence of N PIL images."""


class RewardStatus(enum.IntEnum):
    """Why an entry of the reward matrix has (or lacks) a score. Only OK entries are finite."""

    NOT_REQUESTED = 0  # the sample's weight for this reward is 0
    OK = 1
    NOT_APPLICABLE = 2  # the reward does not apply (counted in na_rate)
    ERROR = 3  # the service answered with an error for this sample (counted in fail_rate)
    UNAVAILABLE = 4  # the whole call failed: service down, circuit open, deadline (counted in fail_rate)


_FROM_OUTCOME = {
    Outcome.OK: RewardStatus.OK,
    Outcome.NOT_APPLICABLE: RewardStatus.NOT_APPLICABLE,
    Outcome.ERROR: RewardStatus.ERROR,
}
# What a failed remote call raises: TransientError and CircuitOpenError are ConnectionErrors;
# RewardServiceError is a non-retryable status from the service (e.g. DEADLINE_EXCEEDED).
_CALL_FAILURES = (ConnectionError, TimeoutError, RewardServiceError)


class ScoreClient(Protocol):
    """What a remote reward needs of a client: `deepgen_common.client.RewardClient.score`."""

    def score(self, samples: Sequence[Sample], mode: Mode = Mode.POINTWISE) -> list[Result]: ...


@dataclass(frozen=True)
class LocalReward:
    """A reward computed in-process: ``fn(images, prompts) -> (B,)`` float, NaN = not applicable."""

    fn: Callable[[Images, Sequence[str]], Tensor]


@dataclass(frozen=True)
class RemoteReward:
    """A reward computed by a service through a `ScoreClient`, pointwise or in groups."""

    client: ScoreClient
    mode: Mode = Mode.POINTWISE


RewardFn = LocalReward | RemoteReward


def build_reward(
    name: str,
    *,
    url: str | None = None,
    clip: Callable[[Images, Sequence[str]], Tensor] | None = None,
    timeout_s: float = 120.0,
) -> RewardFn:
    """The reward called ``name``: ``clip_sim`` needs ``clip`` (a `ClipSimReward`), the remote
    rewards need ``url`` (from ``OCR_URL`` / ``UNIFIEDREWARD_THINK_URL``)."""
    if name not in REWARD_NAMES:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(REWARD_NAMES)}")
    if name in ("jpeg_compressibility", "jpeg_incompressibility"):
        return LocalReward(getattr(jpeg, name))
    if name == "clip_sim":
        if clip is None:
            raise ValueError("reward 'clip_sim' needs a CLIP model: pass clip=ClipSimReward.from_pretrained(...)")
        return LocalReward(clip)
    if not url:
        raise ValueError(f"reward {name!r} needs the URL of its service: set {REWARD_URL_ENV[name]}")
    mode = Mode.GROUP if name == "unifiedreward_think" else Mode.POINTWISE
    return RemoteReward(RewardClient(url, timeout_s=timeout_s), mode)


@dataclass(frozen=True)
class RewardBatch:
    """Scores of N samples under K rewards.

    Attributes:
        names: the K reward names, in column order.
        rewards: (N, K) float32, NaN wherever status is not OK.
        status: (N, K) int8 `RewardStatus` codes.
        group_ids: the N group ids.
        wait_s: seconds `RewardScorer.gather` blocked waiting for the scores (``time/reward``).
    """

    names: tuple[str, ...]
    rewards: Tensor
    status: Tensor
    group_ids: tuple[str, ...]
    wait_s: float = 0.0


class RewardScorer:
    """Fills the (N, K) reward matrix of a rollout, one micro-batch at a time.

    ``rewards`` maps each reward name to its function; its order is the column order of the
    ``weights`` passed in and of the matrix returned. Remote rewards of a micro-batch run
    concurrently with each other and with the caller; ``call_failures`` counts, per reward, the
    calls that failed entirely since construction, and ``last_errors`` keeps, per reward, the
    message of its latest failed call or per-sample error.
    """

    def __init__(self, rewards: Mapping[str, RewardFn], max_workers: int = 4, png_compress_level: int = 1) -> None:
        unknown = [n for n in rewards if n not in REWARD_NAMES]
        if unknown:
            raise ValueError(f"unknown rewards {unknown}; valid rewards: {', '.join(REWARD_NAMES)}")
        if not rewards:
            raise ValueError("no rewards given: pass at least one of " + ", ".join(REWARD_NAMES))
        self.rewards = dict(rewards)
        self.names = tuple(rewards)
        self.png_compress_level = png_compress_level
        self.call_failures = dict.fromkeys(self.names, 0)
        self.last_errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="reward-scorer")

    def score(self, images: Images, prompts: Sequence[str], group_ids: Sequence[str], weights: Tensor) -> RewardBatch:
        """Score one batch and wait for it (`submit` + `gather`)."""
        return self.gather([self.submit(images, prompts, group_ids, weights)])

    def submit(
        self, images: Images, prompts: Sequence[str], group_ids: Sequence[str], weights: Tensor
    ) -> Future[RewardBatch]:
        """Start scoring a micro-batch; returns at once (after any in-process reward).

        Args:
            images: uint8 (N, H, W, 3) RGB tensor (moved to the CPU here) or N PIL images.
            prompts: N prompts.
            group_ids: N group ids (the prompt's group; required by group-mode rewards).
            weights: (N, K) finite float, the sample's weight per reward; 0 = do not request.
        """
        if isinstance(images, Tensor) and (images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8):
            raise ValueError(
                f"images must be a uint8 (N, H, W, 3) tensor, got {images.dtype} of shape {tuple(images.shape)}"
            )
        images = images.detach().cpu() if isinstance(images, Tensor) else list(images)
        prompts, group_ids = list(prompts), list(group_ids)
        n = len(images)
        weights = self._check(n, prompts, group_ids, weights)
        rewards = torch.full((n, len(self.names)), math.nan, dtype=torch.float32)
        status = torch.zeros((n, len(self.names)), dtype=torch.int8)
        result: Future[RewardBatch] = Future()
        encoded = _PngCache(images, self.png_compress_level)
        parts: list[tuple[int, Future[tuple[list[int], list[Result] | None]]]] = []
        for col, (name, fn) in enumerate(self.rewards.items()):
            rows = torch.nonzero(weights[:, col] != 0).flatten().tolist()
            if not rows:
                continue
            if isinstance(fn, LocalReward):
                values = fn.fn(_select(images, rows), [prompts[i] for i in rows]).detach().float().cpu()
                if values.shape != (len(rows),):
                    raise ValueError(f"reward {name} returned shape {tuple(values.shape)} for {len(rows)} samples")
                rewards[rows, col] = values
                status[rows, col] = torch.where(torch.isnan(values), RewardStatus.NOT_APPLICABLE, RewardStatus.OK).to(
                    torch.int8
                )
            else:
                task = self._pool.submit(self._score_remote, name, fn, encoded, prompts, group_ids, rows)
                parts.append((col, task))
        batch = RewardBatch(self.names, rewards, status, tuple(group_ids))
        if not parts:
            result.set_result(batch)
            return result

        remaining = [len(parts)]
        lock = threading.Lock()

        def on_done(col: int, task: Future[tuple[list[int], list[Result] | None]]) -> None:
            with lock:  # one writer at a time, and exactly one of set_result / set_exception
                if result.done():
                    return
                try:
                    rows, results = task.result()
                except BaseException as exc:  # a bug or bad input, not an outage: surface it in gather
                    result.set_exception(exc)
                    return
                if results is None:  # the call failed entirely; the rewards stay NaN
                    status[rows, col] = RewardStatus.UNAVAILABLE
                else:
                    for i, r in zip(rows, results, strict=True):
                        rewards[i, col] = r.value
                        status[i, col] = _FROM_OUTCOME[r.outcome]
                remaining[0] -= 1
                if remaining[0] == 0:
                    result.set_result(batch)

        for col, task in parts:
            task.add_done_callback(lambda t, col=col: on_done(col, t))
        return result

    def gather(self, futures: Sequence[Future[RewardBatch]]) -> RewardBatch:
        """Wait for submitted micro-batches; their rows concatenated in order, with ``wait_s`` set.

        Raises:
            ValueError: a group-mode reward saw one group id in two micro-batches (its win rates
                would be computed over partial groups).
        """
        start = time.perf_counter()
        batches = [f.result() for f in futures]
        wait_s = time.perf_counter() - start
        if not batches:
            empty = torch.zeros((0, len(self.names)))
            return RewardBatch(self.names, empty, empty.to(torch.int8), (), wait_s)
        self._check_whole_groups(batches)
        return RewardBatch(
            self.names,
            torch.cat([b.rewards for b in batches]),
            torch.cat([b.status for b in batches]),
            tuple(g for b in batches for g in b.group_ids),
            wait_s,
        )

    def close(self) -> None:
        """Stop the thread pool and close the clients."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fn in self.rewards.values():
            if isinstance(fn, RemoteReward) and hasattr(fn.client, "close"):
                fn.client.close()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _score_remote(
        self,
        name: str,
        fn: RemoteReward,
        encoded: _PngCache,
        prompts: list[str],
        group_ids: list[str],
        rows: list[int],
    ) -> tuple[list[int], list[Result] | None]:
        """Results for ``rows`` (requested samples) of one remote reward, in a pool thread; None
        when the call failed entirely."""
        sent = rows
        if fn.mode is Mode.GROUP:
            wanted = {group_ids[i] for i in rows}
            sent = [i for i, g in enumerate(group_ids) if g in wanted]
        samples = [Sample(encoded.get(i), prompts[i], ImageFormat.PNG, group_ids[i]) for i in sent]
        try:
            results = fn.client.score(samples, fn.mode)
        except _CALL_FAILURES as exc:
            with self._lock:
                self.call_failures[name] += 1
                self.last_errors[name] = f"{type(exc).__name__}: {exc}"
            log.warning("reward %s failed for %d samples, their scores are NaN: %s", name, len(rows), exc)
            return rows, None
        if len(results) != len(samples):
            raise RuntimeError(f"reward {name} returned {len(results)} results for {len(samples)} samples")
        errors = [r.error for r in results if r.outcome is Outcome.ERROR]
        if errors:
            with self._lock:
                self.last_errors[name] = errors[-1]
        by_row = dict(zip(sent, results, strict=True))
        return rows, [by_row[i] for i in rows]

    def _check(self, n: int, prompts: list[str], group_ids: list[str], weights: Tensor) -> Tensor:
        if len(prompts) != n or len(group_ids) != n:
            raise ValueError(
                f"got {n} images, {len(prompts)} prompts and {len(group_ids)} group ids; pass one of each per sample"
            )
        if weights.shape != (n, len(self.names)):
            raise ValueError(
                f"weights must be (N, K) = ({n}, {len(self.names)}) for rewards {list(self.names)}, "
                f"got {tuple(weights.shape)}"
            )
        weights = weights.detach().cpu()
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("weights must be finite (0 = reward not used for that sample)")
        for col, (name, fn) in enumerate(self.rewards.items()):
            if isinstance(fn, RemoteReward) and fn.mode is Mode.GROUP:
                missing = [i for i in range(n) if weights[i, col] != 0 and not group_ids[i]]
                if missing:
                    raise ValueError(f"group-mode reward {name!r} needs a group id on every sample; missing {missing}")
        return weights

    def _check_whole_groups(self, batches: list[RewardBatch]) -> None:
        group_cols = [
            c for c, fn in enumerate(self.rewards.values()) if isinstance(fn, RemoteReward) and fn.mode is Mode.GROUP
        ]
        for col in group_cols:
            seen: dict[str, int] = {}
            for b, batch in enumerate(batches):
                requested = batch.status[:, col] != RewardStatus.NOT_REQUESTED
                for g in {batch.group_ids[i] for i in torch.nonzero(requested).flatten().tolist()}:
                    if seen.setdefault(g, b) != b:
                        raise ValueError(
                            f"group {g!r} of reward {self.names[col]!r} was split over micro-batches {seen[g]} and "
                            f"{b}, so its win rates cover part of the group; make rollout_micro_batch_size a "
                            "multiple of rollout_n"
                        )


def reward_metrics(names: Sequence[str], rewards: Tensor, status: Tensor) -> dict[str, float]:
    """Per-reward statistics of a batch: ``reward/<name>/{mean,std,fail_rate,na_rate}``.

    Rates are fractions of the requested entries (status not NOT_REQUESTED); mean and std
    (unbiased, 0 for a single value; NaN when nothing scored) are over the OK entries. A reward
    requested for no sample has no entry.

    Args:
        names: the K reward names, in column order.
        rewards: (N, K) float, NaN where not OK.
        status: (N, K) `RewardStatus` codes.
    """
    if rewards.shape != status.shape or rewards.ndim != 2 or rewards.shape[1] != len(names):
        raise ValueError(
            f"rewards {tuple(rewards.shape)} and status {tuple(status.shape)} must both be (N, {len(names)})"
        )
    metrics: dict[str, float] = {}
    for col, name in enumerate(names):
        s = status[:, col]
        requested = int((s != RewardStatus.NOT_REQUESTED).sum())
        if requested == 0:
            continue
        ok = rewards[:, col][s == RewardStatus.OK].double()
        failed = int(((s == RewardStatus.ERROR) | (s == RewardStatus.UNAVAILABLE)).sum())
        metrics[f"reward/{name}/mean"] = float(ok.mean()) if ok.numel() else math.nan
        metrics[f"reward/{name}/std"] = float(ok.std()) if ok.numel() >= 2 else (0.0 if ok.numel() else math.nan)
        metrics[f"reward/{name}/fail_rate"] = failed / requested
        metrics[f"reward/{name}/na_rate"] = int((s == RewardStatus.NOT_APPLICABLE).sum()) / requested
    return metrics


class _PngCache:
    """PNG bytes of a micro-batch, encoded once on first use and shared by the remote rewards."""

    def __init__(self, images: Tensor | list[Image.Image], compress_level: int) -> None:
        self._images = images
        self._compress_level = compress_level
        self._lock = threading.Lock()
        self._encoded: dict[int, bytes] = {}

    def get(self, i: int) -> bytes:
        with self._lock:
            if i not in self._encoded:
                image = self._images[i]
                if isinstance(image, Tensor):
                    image = Image.fromarray(np.ascontiguousarray(image.numpy()))
                buffer = io.BytesIO()
                # Level 1: ~5x faster than the default 6 for ~10% more bytes; the link is not the bottleneck.
                image.save(buffer, format="PNG", compress_level=self._compress_level)
                self._encoded[i] = buffer.getvalue()
            return self._encoded[i]


def _select(images: Tensor | list[Image.Image], rows: list[int]) -> Images:
    return images[rows] if isinstance(images, Tensor) else [images[i] for i in rows]
