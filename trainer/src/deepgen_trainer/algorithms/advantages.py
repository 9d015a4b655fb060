"""Multi-reward advantages of MR-GRPO: one scalar per sample from an (N, K) reward matrix.

Rewards arrive as an (N, K) matrix, one column per reward model, with NaN where a reward is missing
(the service said *not applicable*, or scoring failed, or the sample's dataset does not use that
reward). A missing entry is never a 0.0 reward and never enters a mean or a standard deviation: it is
*neutral*, it counts as the mean of that reward over the entries the advantage type compares it with
(its group, or the batch for reinforcepp), so a failed call neither rewards nor punishes a sample.
Groups are consecutive blocks of ``group_size`` rows (the ``rollout_n`` images of one prompt), so a
group never straddles two ranks.

Batch-level statistics (gdpo's final normalisation, grpo_global_std's std, reinforcepp's mean and
std) can span every rank through an ``all_gather`` callable supplied by the caller; this module never
imports ``torch.distributed``. What travels is a fixed-size (1, 3) float64 summary per rank
[count, mean, M2] (M2 = Σ(x − mean)²), merged with Chan et al.'s parallel formula: no padding for
ranks with different batch sizes, and no cancellation of a sum-of-squares formula.

Statistics are computed in float64 (N·K is tiny) and the result is returned in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

AdvantageType = Literal["gdpo", "grpo", "grpo_global_std", "reinforcepp"]
ADVANTAGE_TYPES: tuple[str, ...] = get_args(AdvantageType)
# The types that compare a sample with the other members of its group need groups of at least 2.
GROUP_NORMALISING_TYPES: tuple[str, ...] = ("gdpo", "grpo", "grpo_global_std")

AllGather = Callable[[Tensor], Tensor]
"""Concatenates a tensor over all ranks along dim 0, in rank order: (1, m) → (world_size, m)."""


def compute_advantages(
    adv_type: AdvantageType,
    rewards: Tensor,
    weights: Tensor,
    group_size: int,
    eps: float = 1e-4,
    clip: float = 5.0,
    all_gather: AllGather | None = None,
) -> Tensor:
    """Advantages (N,) float32 from per-reward scores, dataset weights and groups of ``group_size``.

    Let valid_ik = "R_ik is not NaN", S_i = Σ_{k valid} w_ik·R_ik (the weighted reward of sample i;
    `weighted_reward_sum`), and call a sample *scored* when it has at least one valid reward.
    Standard deviations are unbiased (``torch.std``, correction 1). Every type ends with a clamp to
    [−clip, clip] (`clamp_fraction` tells how much of the batch hit it).

    - ``"gdpo"`` (default; group reward-decoupled normalisation): for each reward k and each group g,
      A_ik = (R_ik − mean_g,k)/(std_g,k + eps) over the group's valid entries of column k; then
      S'_i = Σ_{k valid} w_ik·A_ik; then batch normalisation (S' − mean)/(std + eps) over the scored
      samples. Normalising each reward before mixing keeps a reward with a large spread from
      drowning the others. There is no renormalisation of the weights over a sample's valid
      rewards: a missing reward contributes nothing, exactly as if that sample had the group's mean
      for it (advantage 0). Renormalising would instead inflate the remaining rewards of a sample
      whose OCR call failed relative to its group mates, so a service failure would change the
      advantage; the batch normalisation that follows sets the overall scale anyway.
    - ``"grpo"``: group normalisation of S over the group's scored members.
    - ``"grpo_global_std"``: (S − group mean of S)/(batch std of S + eps).
    - ``"reinforcepp"``: (S − batch mean of S)/(batch std of S + eps); groups are not used.

    Missing entries are neutral in every type. In the three S-based types a sample's missing R_ik is
    replaced, before S is formed, by the mean of column k over the valid entries of its group (grpo,
    grpo_global_std) or of the batch (reinforcepp; over every rank with ``all_gather``); a column with
    no valid entry there stays out of S for all of them alike. Summing only the valid rewards instead
    would compare a sample whose OCR call failed on fewer rewards than its group mates and give it a
    negative advantage. gdpo needs no replacement: its per-reward advantage of a missing entry is
    already 0, the value of an entry equal to the group mean.

    Zero advantages, by construction (never NaN):
    - a group in which reward k has fewer than 2 valid entries, or identical values (zero spread),
      contributes 0 for k (gdpo), resp. gives its members 0 (grpo); identical rewards are detected
      exactly (max == min), not through a rounding-sized std;
    - a sample with no valid reward gets 0 and is left out of every statistic;
    - batch statistics over fewer than 2 scored samples use std = 0.

    Args:
        adv_type: one of ``ADVANTAGE_TYPES``.
        rewards: (N, K) float, NaN where missing.
        weights: (N, K) finite float, each sample's dataset weight per reward (0 = not used).
        group_size: rows per group (``rollout_n``); N must be a multiple. Must be >= 2 for the
            group-normalising types.
        eps: added to every std before dividing (> 0).
        clip: the advantages are clamped to [−clip, clip] (> 0; ``math.inf`` disables).
        all_gather: optional; makes the batch statistics global (see `AllGather`); None = this
            rank's batch only. Called once per call for gdpo and grpo_global_std, twice for
            reinforcepp (the per-reward means, then the statistics of S), never for grpo, so every
            rank must use the same ``adv_type``.

    Returns:
        (N,) float32 on ``rewards``' device.
    """
    if adv_type not in ADVANTAGE_TYPES:
        raise ValueError(f"unknown advantage type {adv_type!r}; valid types: {', '.join(ADVANTAGE_TYPES)}")
    _check_inputs(adv_type, rewards, weights, group_size, eps, clip)
    r = rewards.detach().to(torch.float64)
    w = weights.detach().to(torch.float64)
    valid = ~torch.isnan(r)
    scored = valid.any(dim=1)

    if adv_type == "gdpo":
        per_reward = _group_normalise(r, valid, group_size, eps)  # (N, K): each column on its own
        mixed = _weighted_sum(per_reward, w, valid)
        mean, std = _batch_mean_std(mixed, scored, all_gather)
        adv = (mixed - mean) / (std + eps)
    else:
        if adv_type == "reinforcepp":
            filled = _fill_with_batch_means(r, valid, all_gather)
        else:
            filled = _fill_with_group_means(r, valid, group_size)
        total = _weighted_sum(filled, w, ~torch.isnan(filled))
        if adv_type == "grpo":
            adv = _group_normalise(total, scored, group_size, eps)
        elif adv_type == "grpo_global_std":
            group_mean = _group_mean(total, scored, group_size)
            _, std = _batch_mean_std(total, scored, all_gather)
            adv = (total - group_mean) / (std + eps)
        else:
            mean, std = _batch_mean_std(total, scored, all_gather)
            adv = (total - mean) / (std + eps)
    adv = torch.where(scored, adv, 0.0).clamp(-clip, clip)
    return adv.to(torch.float32)


def weighted_reward_sum(rewards: Tensor, weights: Tensor) -> Tensor:
    """S_i = Σ_k w_ik·R_ik over the valid (non-NaN) rewards: (N, K), (N, K) → (N,) float64.

    NaN for a sample with no valid reward (it has no total; logging should skip it).
    """
    r = rewards.detach().to(torch.float64)
    valid = ~torch.isnan(r)
    total = _weighted_sum(r, weights.detach().to(torch.float64), valid)
    return torch.where(valid.any(dim=1), total, torch.nan)


def clamp_fraction(advantages: Tensor, clip: float) -> Tensor:
    """Fraction of samples whose advantage sits at the clamp (|A| >= clip): 0-d float32 (``adv/clamp_frac``).

    A 0-d tensor rather than a Python float so that logging does not force a device sync.
    """
    if advantages.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=advantages.device)
    return (advantages.abs() >= clip).to(torch.float32).mean()


def _weighted_sum(values: Tensor, weights: Tensor, valid: Tensor) -> Tensor:
    """(N, K) → (N,): Σ_k w_ik·x_ik over the valid entries (where, not multiplication by a mask,
    so that the NaNs of invalid entries never propagate)."""
    return torch.where(valid, weights * values, 0.0).sum(dim=1)


def _fill_with_group_means(values: Tensor, valid: Tensor, group_size: int) -> Tensor:
    """(N, K) → (N, K): each missing entry replaced by its column's mean over the group's valid
    entries; NaN stays where the group has no valid entry in that column."""
    x = values.view(values.shape[0] // group_size, group_size, values.shape[1])
    mask = valid.view_as(x)
    count = mask.sum(dim=1, keepdim=True)
    mean = torch.where(mask, x, 0.0).sum(dim=1, keepdim=True) / count.clamp_min(1)
    mean = torch.where(count > 0, mean, torch.nan)
    return torch.where(mask, x, mean).view_as(values)


def _fill_with_batch_means(values: Tensor, valid: Tensor, all_gather: AllGather | None) -> Tensor:
    """(N, K) → (N, K): each missing entry replaced by its column's mean over the batch's valid
    entries (every rank's with all_gather); NaN stays in a column with no valid entry."""
    count = valid.sum(dim=0).to(torch.float64)
    total = torch.where(valid, values, 0.0).sum(dim=0)
    if all_gather is not None:
        parts = all_gather(torch.cat([count, total]).view(1, -1))
        if parts.ndim != 2 or parts.shape[1] != 2 * values.shape[1]:
            raise ValueError(f"all_gather must return (world_size, {2 * values.shape[1]}), got {tuple(parts.shape)}")
        count, total = parts.to(device=values.device, dtype=torch.float64).sum(dim=0).chunk(2)
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.nan)
    return torch.where(valid, values, mean.expand_as(values))


def _group_normalise(values: Tensor, valid: Tensor, group_size: int, eps: float) -> Tensor:
    """(N, ...) → (N, ...): (x − mean_g)/(std_g + eps) over each group's valid entries, per trailing
    index (per reward column); 0 where invalid or where the group has < 2 valid, or identical, values."""
    x = values.view(values.shape[0] // group_size, group_size, *values.shape[1:])
    mask = valid.view_as(x)
    count = mask.sum(dim=1, keepdim=True)
    mean = torch.where(mask, x, 0.0).sum(dim=1, keepdim=True) / count.clamp_min(1)
    dev = torch.where(mask, x - mean, 0.0)
    std = torch.sqrt(dev.square().sum(dim=1, keepdim=True) / (count - 1).clamp_min(1))
    # Identical values: mean and std carry rounding noise of order 1e-17, which the division would
    # turn into arbitrary small advantages. Compare the extremes instead; that test is exact.
    highest = torch.where(mask, x, -torch.inf).amax(dim=1, keepdim=True)
    lowest = torch.where(mask, x, torch.inf).amin(dim=1, keepdim=True)
    informative = mask & (count >= 2) & (highest > lowest)
    return torch.where(informative, dev / (std + eps), 0.0).view_as(values)


def _group_mean(values: Tensor, valid: Tensor, group_size: int) -> Tensor:
    """(N,) → (N,): each sample's group mean over the group's valid entries (0 for an empty group)."""
    x = values.view(values.shape[0] // group_size, group_size)
    mask = valid.view_as(x)
    mean = torch.where(mask, x, 0.0).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp_min(1)
    return mean.expand_as(x).reshape(-1)


def _batch_mean_std(values: Tensor, valid: Tensor, all_gather: AllGather | None) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std (0-d float64) of values[valid], over every rank when all_gather is given."""
    count = valid.sum().to(torch.float64)
    mean = torch.where(valid, values, 0.0).sum() / count.clamp_min(1)
    m2 = torch.where(valid, values - mean, 0.0).square().sum()
    if all_gather is not None:
        parts = all_gather(torch.stack([count, mean, m2]).view(1, 3))
        if parts.ndim != 2 or parts.shape[1] != 3:
            raise ValueError(f"all_gather must return (world_size, 3), got shape {tuple(parts.shape)}")
        parts = parts.to(device=values.device, dtype=torch.float64)
        counts, means, m2s = parts[:, 0], parts[:, 1], parts[:, 2]
        count = counts.sum()
        # Chan et al.: M2 = Σ_r [M2_r + n_r·(mean_r − mean)²]. Empty ranks report mean 0 and weigh 0.
        mean = (counts * means).sum() / count.clamp_min(1)
        m2 = (m2s + counts * (means - mean).square()).sum()
    std = torch.where(count >= 2, torch.sqrt(m2 / (count - 1).clamp_min(1)), 0.0)
    return mean, std


def _check_inputs(adv_type: str, rewards: Tensor, weights: Tensor, group_size: int, eps: float, clip: float) -> None:
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (N, K), got shape {tuple(rewards.shape)}")
    if weights.shape != rewards.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} must equal rewards shape {tuple(rewards.shape)}")
    if not (rewards.is_floating_point() and weights.is_floating_point()):
        raise TypeError(f"rewards and weights must be floating point, got {rewards.dtype} and {weights.dtype}")
    if bool(torch.isinf(rewards).any()):
        raise ValueError("rewards must be finite or NaN (missing); got an infinite reward")
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights must be finite: mark a missing reward with NaN in rewards, not in weights")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if adv_type in GROUP_NORMALISING_TYPES and group_size < 2:
        raise ValueError(
            f"{adv_type!r} normalises within groups of rollout_n images per prompt: rollout_n must be >= 2 "
            f"(got group_size={group_size}); use 'reinforcepp' for one image per prompt"
        )
    if rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"the batch of {rewards.shape[0]} samples is not a whole number of groups of {group_size} "
            f"(rollout_n); every rank must hold complete groups"
        )
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0 (math.inf disables clamping), got {clip}")
