"""Infinite, checkpointable sampler of prompt batches, disjoint across ranks.

Each epoch is one global draw of N (dataset, prompt) slots, made from a generator seeded with
``seed + epoch`` (so every epoch has a new order, and the same one on every rank and every resume):

1. N = the number of prompts in datasets of non-zero weight, rounded up to a multiple of the global
   batch (``prompts_per_rank × world_size``), so one epoch is about one pass and no slot is dropped.
2. Dataset d gets about N·p_d slots, p_d from `TrainData.dataset_probabilities` (∝ weight × size for
   ``sample_proportional``, ∝ weight for ``weight_only``). The counts are rounded by systematic
   sampling (one uniform offset): they sum to N and E[count_d] = N·p_d exactly, so a dataset whose
   share is below one slot per epoch is still drawn at the right long-run rate. This is stratified
   sampling: the proportions hold within every epoch, not only on average.
3. Dataset d's slots walk through fresh permutations of its prompts (no repeat before every prompt
   of d was used, when d is oversampled), and the N slots are shuffled.

Global batch b of the epoch is slots [b·G, (b + 1)·G); rank r takes its slice [b·G + r·P, b·G + (r + 1)·P).
Ranks therefore draw disjoint slots, and their union is the stream of one rank with the whole global
batch: the stream depends on (seed, global batch size), not on how the batch is split over ranks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepgen_trainer.data.prompts import TrainData


@dataclass(frozen=True)
class PromptBatch:
    """One rank's prompts of one step. ``step`` counts global batches since the start of training."""

    prompts: tuple[str, ...]
    dataset_indices: tuple[int, ...]
    epoch: int
    step: int


class PromptSampler:
    """Yields `PromptBatch` es of ``prompts_per_rank`` prompts for ``rank`` of ``world_size``, forever."""

    def __init__(self, data: TrainData, prompts_per_rank: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if prompts_per_rank < 1:
            raise ValueError(f"prompts_per_rank must be >= 1, got {prompts_per_rank}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
        self.data = data
        self.prompts_per_rank = prompts_per_rank
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._probs = np.array(data.dataset_probabilities(), dtype=np.float64)
        self._sizes = np.array([len(d.prompts) for d in data.datasets], dtype=np.int64)
        drawn = int(self._sizes[self._probs > 0].sum())
        g = self.global_batch_size
        self.epoch_length = -(-drawn // g) * g
        self.epoch = 0
        self.batch_in_epoch = 0
        self._plan_epoch = -1
        self._plan = np.empty((0, 2), dtype=np.int64)

    @property
    def global_batch_size(self) -> int:
        return self.prompts_per_rank * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.epoch_length // self.global_batch_size

    @property
    def step(self) -> int:
        """Global batches drawn so far (the step the next batch belongs to)."""
        return self.epoch * self.batches_per_epoch + self.batch_in_epoch

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """The epoch's global slots, (N, 2) int64 rows of (dataset index, prompt index). Pure in (seed, epoch)."""
        rng = np.random.default_rng(self.seed + epoch)
        n = self.epoch_length
        cumulative = np.cumsum(self._probs * n)
        cumulative[-1] = n  # exact total despite float rounding
        offset = rng.random()
        counts = np.diff(np.floor(np.concatenate(([0.0], cumulative)) + offset)).astype(np.int64)
        slots = []
        for d, count in enumerate(counts):
            size = int(self._sizes[d])
            if count <= 0:
                continue
            passes = -(-int(count) // size)
            items = np.concatenate([rng.permutation(size) for _ in range(passes)])[:count]
            slots.append(np.stack([np.full(count, d, dtype=np.int64), items], axis=1))
        plan = np.concatenate(slots)
        return plan[rng.permutation(len(plan))]

    def __iter__(self) -> Iterator[PromptBatch]:
        return self

    def __next__(self) -> PromptBatch:
        if self._plan_epoch != self.epoch:
            self._plan = self.epoch_plan(self.epoch)
            self._plan_epoch = self.epoch
        start = self.batch_in_epoch * self.global_batch_size + self.rank * self.prompts_per_rank
        rows = self._plan[start : start + self.prompts_per_rank]
        batch = PromptBatch(
            prompts=tuple(self.data.datasets[d].prompts[i] for d, i in rows.tolist()),
            dataset_indices=tuple(int(d) for d in rows[:, 0]),
            epoch=self.epoch,
            step=self.step,
        )
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Position of the stream, plus what must match for a resumed run to continue it exactly."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_batch_size": self.global_batch_size,
            "dataset_sizes": [int(s) for s in self._sizes],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a saved stream. The world size may change as long as the global batch does not."""
        expected = {
            "seed": (self.seed, "resume with the same --seed"),
            "global_batch_size": (self.global_batch_size, "keep prompts_per_rank × world_size unchanged"),
            "dataset_sizes": ([int(s) for s in self._sizes], "resume with the same dataset config and files"),
        }
        for key, (value, fix) in expected.items():
            if state[key] != value:
                raise ValueError(f"sampler state has {key}={state[key]!r} but this run has {value!r}; {fix}")
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
