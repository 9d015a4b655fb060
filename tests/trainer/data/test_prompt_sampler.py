"""deepgen_trainer.data.prompt_sampler: proportions of both modes, reseeding, disjoint ranks, exact resume."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from deepgen_trainer.data.prompt_sampler import PromptSampler
from deepgen_trainer.data.prompts import PromptDataset, TrainData


def dataset(name: str, size: int, weight: float) -> PromptDataset:
    return PromptDataset(name, Path(f"{name}.txt"), tuple(f"{name}{i}" for i in range(size)), weight, {"ocr": 1.0})


def train_data(mode: str, *sizes_weights: tuple[int, float]) -> TrainData:
    return TrainData(mode, tuple(dataset(f"d{i}_", n, w) for i, (n, w) in enumerate(sizes_weights)))  # type: ignore[arg-type]


def take(sampler: PromptSampler, n: int) -> list:
    return list(itertools.islice(sampler, n))


def flatten(batches: list) -> list[tuple[int, str]]:
    return [pair for b in batches for pair in zip(b.dataset_indices, b.prompts, strict=True)]


# Sizes 100 and 300, weights 3 and 1.
#   sample_proportional: mass 3·100 : 1·300 = 1 : 1   → each dataset gets 1/2 of the draws.
#   weight_only:         mass 3 : 1                   → dataset 0 gets 3/4 of the draws.
@pytest.mark.parametrize(("mode", "share_of_first"), [("sample_proportional", 0.5), ("weight_only", 0.75)])
def test_empirical_dataset_proportions(mode: str, share_of_first: float) -> None:
    sampler = PromptSampler(train_data(mode, (100, 3.0), (300, 1.0)), prompts_per_rank=8, seed=0)
    pairs = flatten(take(sampler, 500))  # 4000 draws, 10 epochs
    counts = Counter(d for d, _ in pairs)
    assert counts[0] / len(pairs) == pytest.approx(share_of_first, abs=0.01)
    # Within a dataset every prompt is about equally likely.
    per_prompt = Counter(p for d, p in pairs if d == 0)
    assert len(per_prompt) == 100
    assert max(per_prompt.values()) - min(per_prompt.values()) <= 2


def test_sample_proportional_with_equal_weights_is_one_pass_per_epoch() -> None:
    data = train_data("sample_proportional", (7, 1.0), (9, 1.0))
    sampler = PromptSampler(data, prompts_per_rank=4, seed=3)
    assert (sampler.epoch_length, sampler.batches_per_epoch) == (16, 4)
    first_epoch = flatten(take(sampler, 4))
    assert sorted(p for _, p in first_epoch) == sorted(p for d in data.datasets for p in d.prompts)


def test_tiny_weight_is_drawn_at_its_long_run_rate() -> None:
    # Dataset 1's share is 0.01 of a 20-slot epoch = 0.2 slots: systematic rounding must still give it
    # 1 slot in about 1 epoch out of 5, never 0 forever.
    data = train_data("weight_only", (10, 99.0), (10, 1.0))
    pairs = flatten(take(PromptSampler(data, prompts_per_rank=5, seed=11), 4 * 500))
    assert Counter(d for d, _ in pairs)[1] / len(pairs) == pytest.approx(0.01, abs=0.004)


def test_zero_weight_dataset_is_never_drawn() -> None:
    data = train_data("weight_only", (10, 1.0), (10, 0.0))
    sampler = PromptSampler(data, prompts_per_rank=5, seed=0)
    assert sampler.epoch_length == 10
    assert {d for b in take(sampler, 20) for d in b.dataset_indices} == {0}


def test_each_epoch_is_reseeded() -> None:
    sampler = PromptSampler(train_data("sample_proportional", (32, 1.0)), prompts_per_rank=8, seed=5)
    epochs = [flatten(take(sampler, 4)) for _ in range(3)]
    assert len({tuple(e) for e in epochs}) == 3
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # same prompts, new order
    # Epoch e uses seed + e: epoch 1 of seed 5 is epoch 0 of seed 6.
    shifted = PromptSampler(train_data("sample_proportional", (32, 1.0)), prompts_per_rank=8, seed=6)
    assert flatten(take(shifted, 4)) == epochs[1]
    assert [b.epoch for b in take(PromptSampler(sampler.data, 8, seed=5), 6)] == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("mode", ["sample_proportional", "weight_only"])
def test_ranks_draw_disjoint_slices_of_the_single_rank_stream(mode: str) -> None:
    data = train_data(mode, (13, 1.0), (29, 2.0))
    single = take(PromptSampler(data, prompts_per_rank=6, seed=9), 30)
    ranks = [take(PromptSampler(data, prompts_per_rank=2, seed=9, rank=r, world_size=3), 30) for r in range(3)]
    for step, whole in enumerate(single):
        parts = [ranks[r][step] for r in range(3)]
        assert sum((p.prompts for p in parts), ()) == whole.prompts
        assert sum((p.dataset_indices for p in parts), ()) == whole.dataset_indices
        assert {p.step for p in parts} == {whole.step}
        assert {p.epoch for p in parts} == {whole.epoch}
    # Within one epoch the ranks never share a slot; with equal-or-under sampling no prompt repeats.
    data = train_data(mode, (12, 1.0), (12, 1.0))
    streams = [flatten(take(PromptSampler(data, 4, seed=1, rank=r, world_size=2), 3)) for r in range(2)]
    assert not set(streams[0]) & set(streams[1])
    assert len(set(streams[0]) | set(streams[1])) == 24


def test_state_dict_round_trip_continues_identically() -> None:
    data = train_data("weight_only", (10, 1.0), (25, 3.0))
    sampler = PromptSampler(data, prompts_per_rank=4, seed=2, rank=1, world_size=2)
    take(sampler, 13)  # into the 3rd epoch (35 slots → 40 → 5 batches per epoch)
    state = sampler.state_dict()
    expected = take(sampler, 12)
    resumed = PromptSampler(data, prompts_per_rank=4, seed=2, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert take(resumed, 12) == expected
    # Same global batch over a different world size continues the same global stream.
    halves = []
    for r in range(4):
        other = PromptSampler(data, prompts_per_rank=2, seed=2, rank=r, world_size=4)
        other.load_state_dict(state)
        halves.append(next(other).prompts)
    assert halves[2] + halves[3] == expected[0].prompts


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 3}, "--seed"),
        ({"prompts_per_rank": 2}, "prompts_per_rank × world_size"),
    ],
)
def test_load_state_dict_rejects_a_different_stream(change: dict, message: str) -> None:
    data = train_data("weight_only", (10, 1.0))
    state = PromptSampler(data, prompts_per_rank=4, seed=2).state_dict()
    kwargs = {"prompts_per_rank": 4, "seed": 2} | change
    with pytest.raises(ValueError, match=message):
        PromptSampler(data, **kwargs).load_state_dict(state)
    with pytest.raises(ValueError, match="same dataset config"):
        PromptSampler(train_data("weight_only", (11, 1.0)), 4, seed=2).load_state_dict(state)


def test_deterministic_and_bad_arguments() -> None:
    data = train_data("sample_proportional", (5, 1.0), (7, 1.0))
    assert take(PromptSampler(data, 3, seed=4, rank=1, world_size=2), 9) == take(
        PromptSampler(data, 3, seed=4, rank=1, world_size=2), 9
    )
    with pytest.raises(ValueError, match="rank must be in"):
        PromptSampler(data, 3, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="prompts_per_rank must be >= 1"):
        PromptSampler(data, 0, seed=0)


def test_global_batch_larger_than_the_data_still_yields() -> None:
    sampler = PromptSampler(train_data("sample_proportional", (3, 1.0)), prompts_per_rank=4, seed=0, world_size=2)
    assert sampler.epoch_length == 8
    batch = next(sampler)
    assert len(batch.prompts) == 4
    assert batch.step == 0
