"""deepgen_trainer.algorithms.advantages: hand-derived cases, parity with a naive loop, NaN masking, all-gather."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.testing import assert_close

from deepgen_trainer.algorithms.advantages import (
    ADVANTAGE_TYPES,
    clamp_fraction,
    compute_advantages,
    weighted_reward_sum,
)

NAN = math.nan
EPS = 1e-4


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and unbiased std (0 for fewer than 2 values), by hand."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n >= 2 else 0.0
    return mean, std


def naive_advantages(
    adv_type: str, rewards: torch.Tensor, weights: torch.Tensor, group_size: int, eps: float = EPS, clip: float = 5.0
) -> torch.Tensor:
    """The documented semantics with Python loops over samples, groups and rewards."""
    r, w = rewards.tolist(), weights.tolist()
    n = len(r)
    k_count = rewards.shape[1]
    groups = [range(g, g + group_size) for g in range(0, n, group_size)]
    valid = [[not math.isnan(x) for x in row] for row in r]
    scored = [any(row) for row in valid]

    def weighted(values: list[list[float]], i: int) -> float:
        return sum(w[i][k] * values[i][k] for k in range(k_count) if valid[i][k])

    def group_normalised(values: list[float], members: list[bool]) -> list[float]:
        out = [0.0] * n
        for group in groups:
            idx = [i for i in group if members[i]]
            vals = [values[i] for i in idx]
            if len(vals) < 2 or max(vals) == min(vals):
                continue
            mean, std = _mean_std(vals)
            for i in idx:
                out[i] = (values[i] - mean) / (std + eps)
        return out

    if adv_type == "gdpo":
        per_reward = [[0.0] * k_count for _ in range(n)]
        for k in range(k_count):
            column = group_normalised([r[i][k] for i in range(n)], [valid[i][k] for i in range(n)])
            for i in range(n):
                per_reward[i][k] = column[i]
        mixed = [weighted(per_reward, i) for i in range(n)]
        mean, std = _mean_std([mixed[i] for i in range(n) if scored[i]])
        adv = [(mixed[i] - mean) / (std + eps) for i in range(n)]
    else:
        # A missing entry counts as its column's mean over the valid entries of the group (the batch
        # for reinforcepp); a column with no valid entry there stays out.
        sets = [range(n)] if adv_type == "reinforcepp" else groups
        filled = [row[:] for row in r]
        for members in sets:
            for k in range(k_count):
                vals = [r[i][k] for i in members if valid[i][k]]
                for i in members:
                    if not valid[i][k] and vals:
                        filled[i][k] = sum(vals) / len(vals)
        total = [sum(w[i][k] * filled[i][k] for k in range(k_count) if not math.isnan(filled[i][k])) for i in range(n)]
        if adv_type == "grpo":
            adv = group_normalised(total, scored)
        elif adv_type == "grpo_global_std":
            _, std = _mean_std([total[i] for i in range(n) if scored[i]])
            adv = [0.0] * n
            for group in groups:
                members = [i for i in group if scored[i]]
                if members:
                    group_mean = sum(total[i] for i in members) / len(members)
                    for i in members:
                        adv[i] = (total[i] - group_mean) / (std + eps)
        else:
            mean, std = _mean_std([total[i] for i in range(n) if scored[i]])
            adv = [(total[i] - mean) / (std + eps) for i in range(n)]
    return torch.tensor([max(-clip, min(clip, a)) if scored[i] else 0.0 for i, a in enumerate(adv)])


def _random_batch(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards with ~25% NaN, one all-NaN sample, one constant reward column in the first group."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(n, k, generator=g, dtype=torch.float64)
    rewards[torch.rand(n, k, generator=g) < 0.25] = NAN
    rewards[:4, 0] = 0.5
    rewards[1] = NAN
    weights = torch.rand(n, k, generator=g, dtype=torch.float64) * 2
    return rewards, weights


# --- hand-derived ---


def test_gdpo_hand_derived_two_rewards_two_groups() -> None:
    # Two rewards (k=0 "ocr", k=1 "unified"), two groups of 3. Dataset weights: group 0 uses
    # (1.0, 0.5), group 1 uses (2.0, 1.0). Sample 3's OCR failed (NaN).
    rewards = torch.tensor(
        [[0.0, 0.2], [0.5, 0.2], [1.0, 0.2], [NAN, 0.0], [0.3, 0.5], [0.7, 1.0]],
    )
    weights = torch.tensor([[1.0, 0.5]] * 3 + [[2.0, 1.0]] * 3)
    # Per reward, per group (unbiased std, eps = 1e-4):
    #   g0, ocr: [0, 0.5, 1] → mean 0.5, std 0.5 → [−a, 0, a], a = 0.5/0.5001 = 0.99980004
    #   g0, unified: [0.2, 0.2, 0.2] identical → [0, 0, 0]
    #   g1, ocr: [NaN, 0.3, 0.7] → over the 2 valid: mean 0.5, std √0.08 = 0.28284271
    #            → [0 (masked), −b, b], b = 0.2/(0.28284271 + 1e-4) = 0.70685687
    #   g1, unified: [0, 0.5, 1] → [−a, 0, a]
    # Weighted sums (no renormalisation over the valid rewards):
    #   s0 = 1·(−a) + 0.5·0 = −a      s1 = 0                     s2 = a
    #   s3 = (ocr masked) + 1·(−a) = −a   s4 = 2·(−b) + 1·0 = −2b   s5 = 2b + a
    # Batch: mean 0, unbiased std = √((4a² + 4b² + (2b + a)²)/5) = 1.47121961
    # Advantages = s/(1.47121961 + 1e-4): [−0.67952608, 0, 0.67952608, −0.67952608, −0.96084748, 1.64037356]
    a = 0.5 / (0.5 + EPS)
    b = 0.2 / (math.sqrt(0.08) + EPS)
    sums = [-a, 0.0, a, -a, -2 * b, 2 * b + a]
    std = math.sqrt(sum(s * s for s in sums) / 5)
    expected = torch.tensor([s / (std + EPS) for s in sums])
    adv = compute_advantages("gdpo", rewards, weights, group_size=3)
    assert_close(adv, expected)
    assert_close(adv, torch.tensor([-0.67952608, 0.0, 0.67952608, -0.67952608, -0.96084748, 1.64037356]))


def test_grpo_hand_derived() -> None:
    # One reward, weights 1. Group 0: [1, 2, 3] → mean 2, std 1 → [−1, 0, 1]/(1 + 1e-4).
    # Group 1: [4, NaN, 6] → over the valid pair: mean 5, std √2 → [−1/(√2 + 1e-4), 0, 1/(√2 + 1e-4)].
    rewards = torch.tensor([[1.0], [2.0], [3.0], [4.0], [NAN], [6.0]])
    adv = compute_advantages("grpo", rewards, torch.ones(6, 1), group_size=3)
    c = 1 / (math.sqrt(2) + EPS)
    assert_close(adv, torch.tensor([-1 / (1 + EPS), 0.0, 1 / (1 + EPS), -c, 0.0, c]))


def test_grpo_global_std_hand_derived() -> None:
    # Weighted sums S = [1, 3 | 10, 14] (groups of 2). Group means 2 and 12 → centred [−1, 1, −2, 2].
    # Batch std of S: mean 7, squared deviations 36 + 16 + 9 + 49 = 110, std = √(110/3) = 6.0553007.
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0], [5.0, 0.0], [5.0, 2.0]])
    weights = torch.tensor([[1.0, 2.0], [1.0, 2.0], [2.0, 2.0], [2.0, 2.0]])
    adv = compute_advantages("grpo_global_std", rewards, weights, group_size=2)
    std = math.sqrt(110 / 3)
    assert_close(adv, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (std + EPS))


def test_reinforcepp_hand_derived_with_group_of_one() -> None:
    # No groups: S = [0, 1, 2, NaN-only] → over the 3 scored: mean 1, std 1 → [−1, 0, 1]/(1 + 1e-4), 0.
    rewards = torch.tensor([[0.0], [1.0], [2.0], [NAN]])
    adv = compute_advantages("reinforcepp", rewards, torch.ones(4, 1), group_size=1)
    assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0]) / torch.tensor([1 + EPS, 1, 1 + EPS, 1]))


# --- parity with the naive loop ---


@pytest.mark.parametrize("adv_type", ADVANTAGE_TYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_with_naive_loop(adv_type: str, seed: int) -> None:
    rewards, weights = _random_batch(16, 3, seed)
    adv = compute_advantages(adv_type, rewards, weights, group_size=4)
    expected = naive_advantages(adv_type, rewards, weights, group_size=4)
    assert adv.shape == (16,)
    assert adv.dtype == torch.float32
    assert_close(adv, expected.float())


@pytest.mark.parametrize("adv_type", ADVANTAGE_TYPES)
def test_parity_with_clamp_engaged(adv_type: str) -> None:
    rewards, weights = _random_batch(16, 2, 3)
    rewards[5, 1] = 50.0  # an outlier that the clamp must catch
    adv = compute_advantages(adv_type, rewards, weights, group_size=4, clip=1.0)
    assert_close(adv, naive_advantages(adv_type, rewards, weights, group_size=4, clip=1.0).float())
    assert adv.abs().max() <= 1.0


# --- missing rewards are neutral ---


def test_grpo_failed_call_is_neutral_not_a_zero() -> None:
    # The case: one group, clip_sim 0.5 for everyone, OCR [0.9, 0.5, 0.1, failed]. The failed
    # entry counts as the group's OCR mean 0.5, so S = [1.4, 1.0, 0.6, 1.0]: mean 1.0, and the sample
    # whose call failed sits exactly at the mean (advantage 0), not at the bottom of its group.
    rewards = torch.tensor([[0.5, 0.9], [0.5, 0.5], [0.5, 0.1], [0.5, NAN]])
    adv = compute_advantages("grpo", rewards, torch.ones(4, 2), group_size=4)
    std = math.sqrt((0.4**2 + 0 + 0.4**2 + 0) / 3)
    assert_close(adv, torch.tensor([0.4, 0.0, -0.4, 0.0]) / (std + EPS))


def test_reinforcepp_prompt_without_quoted_text_is_neutral() -> None:
    # OCR is N/A for the whole of group 1 (no quoted text): its OCR counts as the batch's OCR mean,
    # 0.5, so group 1 is compared on clip_sim alone instead of all sitting ~1 std below group 0.
    rewards = torch.tensor([[0.5, 0.2], [0.5, 0.8], [0.4, NAN], [0.6, NAN]])
    adv = compute_advantages("reinforcepp", rewards, torch.ones(4, 2), group_size=2)
    totals = [0.7, 1.3, 0.9, 1.1]  # mean 1.0
    std = math.sqrt(sum((t - 1.0) ** 2 for t in totals) / 3)
    assert_close(adv, torch.tensor([t - 1.0 for t in totals]) / (std + EPS))


@pytest.mark.parametrize("adv_type", ADVANTAGE_TYPES)
@pytest.mark.parametrize("case", ["failed call", "n/a prompt", "whole group n/a"])
def test_missing_entries_give_the_neutral_advantage(adv_type: str, case: str) -> None:
    # Two rewards, two groups of 3; clip_sim (column 0) is the same within group 0. In the S-based
    # types the advantages with NaN entries equal those of the same batch with each NaN replaced by
    # the mean it stands for (the group's valid entries of that reward; the batch's for
    # reinforcepp). gdpo leaves a missing entry out of its column's group statistics and gives it
    # the per-reward advantage 0 (the parity test checks it against the naive loop).
    rewards = torch.tensor([[0.2, 0.1], [0.2, 0.5], [0.2, 0.9], [0.6, 0.3], [0.4, 0.4], [0.8, 0.8]])
    missing = {"failed call": [(1, 1)], "n/a prompt": [(1, 1), (4, 1)], "whole group n/a": [(3, 1), (4, 1), (5, 1)]}
    with_nan = rewards.clone()
    for i, k in missing[case]:
        with_nan[i, k] = NAN
    weights = torch.tensor([[1.0, 2.0]] * 6)
    adv = compute_advantages(adv_type, with_nan, weights, group_size=3)
    assert torch.isfinite(adv).all()
    if case == "failed call" and adv_type != "reinforcepp":
        # Sample 1: clip_sim equal to its group mates', OCR missing → exactly the group's mean.
        assert adv[1].abs() < 1e-6
    if adv_type == "gdpo":
        assert_close(adv, naive_advantages(adv_type, with_nan, weights, group_size=3).float())
        return
    expected_input = with_nan.clone()
    for i, k in missing[case]:
        members = range(6) if adv_type == "reinforcepp" else range(3 * (i // 3), 3 * (i // 3) + 3)
        vals = [with_nan[j, k].item() for j in members if not math.isnan(with_nan[j, k].item())]
        # A group with no OCR at all: nothing to compare with, the column stays out of its sums alike.
        expected_input[i, k] = sum(vals) / len(vals) if vals else 0.0
    assert_close(adv, compute_advantages(adv_type, expected_input, weights, group_size=3))


def test_all_gather_fills_reinforcepp_with_the_global_means() -> None:
    rewards = torch.tensor([[0.5, 0.2], [0.5, 0.8], [0.4, NAN], [0.6, NAN]])
    world = FakeProcessGroup(2)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(compute_advantages, "reinforcepp", rewards[2 * r : 2 * r + 2], torch.ones(2, 2), 2,
                        all_gather=world.all_gather(r))
            for r in range(2)
        ]  # fmt: skip
        per_rank = [f.result(timeout=20) for f in futures]
    assert_close(torch.cat(per_rank), compute_advantages("reinforcepp", rewards, torch.ones(4, 2), group_size=2))


# --- masking and edge cases ---


def test_identical_rewards_give_exactly_zero() -> None:
    # 0.1 + 0.2-style values whose mean is not exactly representable: the result must still be 0.0,
    # not rounding noise divided by eps.
    rewards = torch.tensor([[0.7], [0.7], [0.7], [0.1], [0.2], [0.3]])
    adv = compute_advantages("grpo", rewards, torch.ones(6, 1), group_size=3)
    assert torch.equal(adv[:3], torch.zeros(3))
    # gdpo: the identical reward contributes 0; the other reward alone drives the advantage.
    rewards2 = torch.tensor([[0.7, 0.0], [0.7, 1.0], [0.7, 2.0]])
    adv2 = compute_advantages("gdpo", rewards2, torch.ones(3, 2), group_size=3)
    only_second = compute_advantages("gdpo", rewards2[:, 1:], torch.ones(3, 1), group_size=3)
    assert_close(adv2, only_second)


def test_gdpo_single_valid_entry_in_a_group_contributes_zero() -> None:
    # Reward 0 is valid for one member of the group only: no comparison possible → 0 for it.
    rewards = torch.tensor([[0.9, 0.1], [NAN, 0.5], [NAN, 0.9]])
    adv = compute_advantages("gdpo", rewards, torch.ones(3, 2), group_size=3)
    only_second = compute_advantages("gdpo", rewards[:, 1:], torch.ones(3, 1), group_size=3)
    assert_close(adv, only_second)


@pytest.mark.parametrize("adv_type", ADVANTAGE_TYPES)
def test_sample_with_no_valid_reward_gets_zero(adv_type: str) -> None:
    rewards = torch.tensor([[0.1, 0.3], [NAN, NAN], [0.9, 0.2], [0.4, 0.8]])
    weights = torch.ones(4, 2)
    adv = compute_advantages(adv_type, rewards, weights, group_size=2)
    assert adv[1] == 0
    assert torch.isfinite(adv).all()
    # Its weights are irrelevant.
    weights2 = weights.clone()
    weights2[1] = 7.0
    assert torch.equal(compute_advantages(adv_type, rewards, weights2, group_size=2), adv)


@pytest.mark.parametrize("adv_type", ["reinforcepp", "grpo_global_std", "gdpo"])
def test_sample_with_no_valid_reward_stays_out_of_batch_statistics(adv_type: str) -> None:
    # Replace a whole group by all-NaN samples: the other group's advantages must not change
    # compared with the batch that never had them.
    rewards = torch.tensor([[0.1, 0.3], [0.9, 0.2], [0.4, 0.8], [0.6, 0.1]])
    weights = torch.tensor([[1.0, 0.5], [1.0, 0.5], [1.0, 0.5], [1.0, 0.5]])
    with_nan = torch.cat([rewards, torch.full((2, 2), NAN)])
    adv = compute_advantages(adv_type, with_nan, torch.cat([weights, torch.ones(2, 2)]), group_size=2)
    assert_close(adv[:4], compute_advantages(adv_type, rewards, weights, group_size=2))
    assert torch.equal(adv[4:], torch.zeros(2))


def test_weights_apply_per_sample() -> None:
    # Same raw rewards, different dataset weights per sample: grpo compares the weighted sums.
    # S = [1·1, 3·1] → [−1, 1]/(√2 + 1e-4).
    rewards = torch.tensor([[1.0], [1.0]])
    adv = compute_advantages("grpo", rewards, torch.tensor([[1.0], [3.0]]), group_size=2)
    c = 1 / (math.sqrt(2) + EPS)
    assert_close(adv, torch.tensor([-c, c]))
    # gdpo: a weight of 0 removes that reward from the sample's mix.
    rewards = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    weights = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    adv = compute_advantages("gdpo", rewards, weights, group_size=2)
    assert adv[0] < 0 < adv[1]
    assert adv[2] > 0 > adv[3]


def test_weighted_reward_sum() -> None:
    rewards = torch.tensor([[1.0, NAN], [NAN, NAN], [2.0, 3.0]])
    weights = torch.tensor([[2.0, 5.0], [1.0, 1.0], [1.0, 0.5]])
    total = weighted_reward_sum(rewards, weights)
    assert total[0] == 2.0
    assert total[2] == 3.5
    assert math.isnan(total[1])


def test_clamp_fraction() -> None:
    rewards = torch.tensor([[0.0], [0.0], [0.0], [0.0], [0.0], [0.0], [0.0], [100.0]])
    adv = compute_advantages("reinforcepp", rewards, torch.ones(8, 1), group_size=1, clip=1.0)
    # S = 7 zeros and 100: mean 12.5, std 35.355 → the outlier at 2.47 is clamped to 1, the
    # others sit at −0.354.
    assert adv[7] == 1.0
    assert_close(clamp_fraction(adv, 1.0), torch.tensor(1 / 8))
    assert clamp_fraction(torch.empty(0), 5.0) == 0


def test_infinite_clip_disables_clamping() -> None:
    rewards = torch.tensor([[0.0]] * 7 + [[100.0]])
    adv = compute_advantages("reinforcepp", rewards, torch.ones(8, 1), group_size=1, clip=math.inf)
    assert_close(adv, naive_advantages("reinforcepp", rewards, torch.ones(8, 1), 1, clip=math.inf).float())


def test_empty_batch_and_no_rewards() -> None:
    assert compute_advantages("gdpo", torch.empty(0, 2), torch.empty(0, 2), group_size=4).shape == (0,)
    assert torch.equal(compute_advantages("grpo", torch.empty(4, 0), torch.empty(4, 0), group_size=2), torch.zeros(4))


# --- errors ---


def test_unknown_type_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="gdpo, grpo, grpo_global_std, reinforcepp"):
        compute_advantages("ppo", torch.zeros(2, 1), torch.ones(2, 1), 2)  # type: ignore[arg-type]


@pytest.mark.parametrize("adv_type", ["gdpo", "grpo", "grpo_global_std"])
def test_group_of_one_is_rejected_for_group_normalising_types(adv_type: str) -> None:
    with pytest.raises(ValueError, match="rollout_n must be >= 2"):
        compute_advantages(adv_type, torch.zeros(4, 1), torch.ones(4, 1), group_size=1)  # type: ignore[arg-type]


def test_batch_must_be_whole_groups() -> None:
    with pytest.raises(ValueError, match="not a whole number of groups of 4"):
        compute_advantages("gdpo", torch.zeros(6, 1), torch.ones(6, 1), group_size=4)


@pytest.mark.parametrize(
    ("rewards", "weights", "kwargs", "message"),
    [
        (torch.zeros(4), torch.ones(4), {}, r"\(N, K\)"),
        (torch.zeros(4, 2), torch.ones(4, 1), {}, "weights shape"),
        (torch.zeros(4, 1), torch.full((4, 1), NAN), {}, "weights must be finite"),
        (torch.full((4, 1), math.inf), torch.ones(4, 1), {}, "infinite reward"),
        (torch.zeros(4, 1), torch.ones(4, 1), {"eps": 0.0}, "eps must be > 0"),
        (torch.zeros(4, 1), torch.ones(4, 1), {"clip": 0.0}, "clip must be > 0"),
    ],
)
def test_invalid_inputs_are_rejected(
    rewards: torch.Tensor, weights: torch.Tensor, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        compute_advantages("gdpo", rewards, weights, group_size=2, **kwargs)


# --- batch statistics over ranks ---


class FakeProcessGroup:
    """World of threads standing in for ranks: all_gather concatenates every rank's tensor in rank order.

    A stand-in for torch.distributed (no process group is needed to test the statistics), with the
    same contract as concatenating `torch.distributed.nn.all_gather`'s outputs.
    """

    def __init__(self, world_size: int) -> None:
        self._barrier = threading.Barrier(world_size, timeout=10)
        self._slots: list[torch.Tensor | None] = [None] * world_size

    def all_gather(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def gather(tensor: torch.Tensor) -> torch.Tensor:
            self._slots[rank] = tensor.clone()
            self._barrier.wait()
            out = torch.cat([t for t in self._slots if t is not None])
            self._barrier.wait()  # nobody overwrites a slot before every rank has read them all
            return out

        return gather


@pytest.mark.parametrize("adv_type", ADVANTAGE_TYPES)
def test_all_gather_statistics_equal_the_concatenated_batch(adv_type: str) -> None:
    # Ranks of different sizes (8 and 4 samples), NaNs on both.
    rewards, weights = _random_batch(12, 3, seed=5)
    shards = [(rewards[:8], weights[:8]), (rewards[8:], weights[8:])]
    world = FakeProcessGroup(2)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(compute_advantages, adv_type, r, w, 4, all_gather=world.all_gather(rank))
            for rank, (r, w) in enumerate(shards)
        ]
        per_rank = [f.result(timeout=20) for f in futures]
    whole = compute_advantages(adv_type, rewards, weights, 4)
    assert_close(torch.cat(per_rank), whole)
    if adv_type != "grpo":
        # The batch statistics matter: without the gather, rank 1 alone gives different advantages.
        assert not torch.allclose(compute_advantages(adv_type, *shards[1], 4), whole[8:])


def test_all_gather_of_one_rank_is_the_local_batch() -> None:
    rewards, weights = _random_batch(8, 2, seed=6)
    assert_close(
        compute_advantages("gdpo", rewards, weights, 4, all_gather=lambda t: t),
        compute_advantages("gdpo", rewards, weights, 4),
    )


def test_all_gather_with_wrong_shape_is_rejected() -> None:
    rewards, weights = _random_batch(8, 2, seed=7)
    with pytest.raises(ValueError, match="world_size, 3"):
        compute_advantages("gdpo", rewards, weights, 4, all_gather=lambda t: t.flatten())
