"""GRPO-Guard (arXiv 2510.22319): RatioNorm and a 1/(−dt) gradient weight on the clipped surrogate.

Why. For a Gaussian transition x' ~ N(μ, s²·I) with log p the full log-density averaged over D = C·H·W,
Δ = log p_θ(x') − log p_old(x') = [(x' − μ_old)·(μ_θ − μ_old)]/(s²·D) − m/(2s²), m = mean_D (μ_θ − μ_old)².
Under the sampling policy x' − μ_old = s·ε, so the first term has mean 0 and the second, −m/(2s²), shifts
log r below 0 by an amount that grows as s shrinks: the raw ratio drifts below 1 on low-noise steps and
clipping acts on the wrong samples. RatioNorm re-centres and rescales:

    log r̃ = s·(Δ + m/(2s²)) = (ε·(μ_θ − μ_old))/D,

zero-mean with a variance that no longer depends on the step's s. Its gradient with respect to μ_θ is
ε/D, and μ_θ = a·x + b·v_θ with b ∝ dt, so each step's gradient with respect to v_θ still scales with
|dt|; the loss is weighted by 1/(−dt) to even the steps out (the paper's gradient reweighting).

The formula holds only when s is the transition's own std and log p its exact Gaussian log-density:
callers pass the ``std`` that `sde_step_with_logprob` returns (flowgrpo_sde: std_t·√(−dt); cps_sde:
σ'·sin(ηπ/2), scored with ``exact_logprob=True``; dance_sde: η·√(−dt)). The original trainer used
flowgrpo_sde's std_t·√(−dt) for every sampler and cps_sde's simplified score, which leaves the ratio
unnormalised on its default sampler, and dropped the 1/(−dt) weight unless an environment variable was
set. With a std floor (``--logprob_min_std``) both log p and s use the floored std, and the identity
above still holds with s the floored value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Steps are bucketed by their noise level σ for the metrics: high noise, middle, low noise.
NOISE_BUCKETS: tuple[tuple[str, float, float], ...] = (("high", 2 / 3, 1.0), ("mid", 1 / 3, 2 / 3), ("low", 0.0, 1 / 3))


@dataclass(frozen=True)
class GuardLoss:
    """Per-sample outputs of `grpo_guard_loss`, each (B,).

    loss: the weighted clipped surrogate; ratio: the normalised ratio r̃ (what is clipped); raw_ratio:
    exp(Δ), the ratio before normalisation (for the metrics); clipped: r̃ outside [1 − c, 1 + c_high].
    """

    loss: Tensor
    ratio: Tensor
    raw_ratio: Tensor
    clipped: Tensor


def normalized_log_ratio(
    log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor
) -> tuple[Tensor, Tensor]:
    """RatioNorm: (log r̃, Δ) with log r̃ = s·(Δ + m/(2s²)), Δ = log p − log p_old, m = mean_D (μ − μ_old)².

    Args:
        log_prob: (B,) exact Gaussian log-density averaged over D under the current policy (with grad).
        old_log_prob: (B,) float32/float64, the same at rollout.
        mean: μ_θ, (B, C, H, W), the step mean under the current policy (with grad).
        old_mean: μ_old, (B, C, H, W), recorded at rollout (float32).
        std: s, (B,) the transition's std (as `sde_step_with_logprob` returns it), > 0 on trained steps.

    Returns:
        (log r̃, Δ), both (B,) in at least float32. A sample with s = 0 (a deterministic step, never
        trained) gets log r̃ = 0.
    """
    if old_log_prob.dtype not in (torch.float32, torch.float64) or old_mean.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"old_log_prob ({old_log_prob.dtype}) and old_mean ({old_mean.dtype}) must be float32 or float64: "
            "m/(2s) divides their rounding error by a small std; keep the rollout's values in float32"
        )
    if mean.shape != old_mean.shape or not log_prob.shape == old_log_prob.shape == std.shape == mean.shape[:1]:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)}, std {tuple(std.shape)} "
            f"must be (B,) and mean {tuple(mean.shape)}, old_mean {tuple(old_mean.shape)} (B, ...) alike"
        )
    dtype = torch.promote_types(torch.promote_types(log_prob.dtype, mean.dtype), torch.float32)
    delta = log_prob.to(dtype) - old_log_prob.to(dtype)
    diff = mean.to(dtype) - old_mean.detach().to(dtype)
    m = diff.square().mean(dim=tuple(range(1, diff.ndim)))
    s = std.detach().to(dtype)
    stochastic = s > 0
    safe = torch.where(stochastic, s, 1.0)
    log_ratio = torch.where(stochastic, safe * delta + m / (2 * safe), 0.0)
    return log_ratio, delta


def grpo_guard_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    mean: Tensor,
    old_mean: Tensor,
    std: Tensor,
    dt: Tensor | float,
    advantages: Tensor,
    clip_range: float,
    clip_range_high: float | None = None,
) -> GuardLoss:
    """GRPO-Guard's per-sample loss: max(−A·r̃, −A·clip(r̃, 1 − c, 1 + c_high)) / (−dt).

    Args:
        log_prob, old_log_prob, mean, old_mean, std: as in `normalized_log_ratio`.
        dt: σ' − σ < 0 of the step, a float or (B,) tensor.
        advantages: (B,).
        clip_range: c > 0, the lower clip 1 − c (and the upper one when ``clip_range_high`` is None).
        clip_range_high: c_high > 0, the upper clip 1 + c_high (asymmetric clipping).

    Returns:
        `GuardLoss`, every field (B,).
    """
    high = clip_range if clip_range_high is None else clip_range_high
    if not (clip_range > 0 and high > 0):
        raise ValueError(f"clip_range must be > 0 and clip_range_high > 0, got {clip_range} and {clip_range_high}")
    log_ratio, delta = normalized_log_ratio(log_prob, old_log_prob, mean, old_mean, std)
    dt_t = torch.as_tensor(dt, dtype=log_ratio.dtype, device=log_ratio.device)
    if bool((dt_t >= 0).any()):
        raise ValueError(f"dt must be < 0 (σ' < σ) on a trained step, got {dt}")
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype)
    low, up = 1.0 - clip_range, 1.0 + high
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(low, up))
    return GuardLoss(
        loss=surrogate / -dt_t, ratio=ratio, raw_ratio=torch.exp(delta.detach()), clipped=(ratio < low) | (ratio > up)
    )


def noise_bucket(sigma: float) -> str:
    """The metrics bucket of a step at noise level σ: ``high`` (σ ≥ 2/3), ``mid``, ``low`` (σ < 1/3)."""
    for name, low, _ in NOISE_BUCKETS:
        if sigma >= low:
            return name
    return NOISE_BUCKETS[-1][0]


def guard_metrics(out: GuardLoss, sigma: float) -> dict[str, Tensor]:
    """The ratio's mean and std before and after RatioNorm and the clip fraction, under the step's
    noise bucket: ``guard/<stat>/<bucket>`` (0-d tensors, no gradient)."""
    bucket = noise_bucket(sigma)
    raw, norm = out.raw_ratio.detach(), out.ratio.detach()
    return {
        f"guard/ratio_raw_mean/{bucket}": raw.mean(),
        f"guard/ratio_raw_std/{bucket}": raw.std(correction=0),
        f"guard/ratio_norm_mean/{bucket}": norm.mean(),
        f"guard/ratio_norm_std/{bucket}": norm.std(correction=0),
        f"guard/clipfrac/{bucket}": out.clipped.float().mean(),
    }
