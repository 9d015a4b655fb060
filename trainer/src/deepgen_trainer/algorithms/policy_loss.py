"""Losses of the MR-GRPO policy update: clipped surrogate, KL penalty, flow-matching (SFT) loss.

All functions return per-sample losses (B,) so that the training loop decides how to average over
samples, chosen steps and micro-batches. Everything is computed in at least float32.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

KLType = Literal["v-based", "x-based"]
KL_TYPES: tuple[str, ...] = get_args(KLType)

# Keeps the KL finite on deterministic steps (std 0); the trainer never trains on those.
_KL_STD_FLOOR = 1e-7


def clipped_policy_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float, clip_range_high: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate: loss = max(−A·r, −A·clip(r, 1 − c, 1 + c_high)), r = exp(log p − log p_old),
    c_high = c unless ``clip_range_high`` is given (asymmetric clipping).

    ``old_log_prob`` must be float32 or float64: with c = 1e-4 (``--clip_range``) the ratio is
    compared against 1 ± 1e-4, and the reference kept old log-probs in bf16, whose rounding error
    (8 significant bits: up to ~2e-3 for |log p| in [0.5, 1)) is about 20× the clip range, so
    clipping became a random mask. A lower-precision ``old_log_prob`` is rejected rather than silently upcast, because
    by then the damage is done. ``log_prob`` (with gradient) and ``advantages`` are promoted.

    With A > 0 the clipped branch is selected for r > 1 + c (gradient 0: the update has gone far
    enough); with A < 0 for r < 1 − c. On the other side of the range the unclipped −A·r is the
    larger term and keeps its gradient (the pessimistic bound).

    Args:
        log_prob: (B,) log-probs under the current policy (requires grad).
        old_log_prob: (B,) float32/float64 log-probs recorded at rollout.
        advantages: (B,).
        clip_range: c > 0.
        clip_range_high: c_high > 0 (default c).

    Returns:
        loss: (B,) per-sample loss, dtype of the promoted inputs (>= float32).
        ratio: (B,) r, same dtype.
        clipped: (B,) bool, r outside [1 − c, 1 + c_high] (``policy/clipfrac`` is its mean).
    """
    if old_log_prob.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"old_log_prob must be float32 or float64, got {old_log_prob.dtype}: keep rollout log-probs in "
            "float32 (bf16 rounding is ~20x the 1e-4 clip range)"
        )
    high = clip_range if clip_range_high is None else clip_range_high
    if not (clip_range > 0 and high > 0):
        raise ValueError(f"clip_range must be > 0 and clip_range_high > 0, got {clip_range} and {clip_range_high}")
    if not log_prob.shape == old_log_prob.shape == advantages.shape:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and advantages "
            f"{tuple(advantages.shape)} must have the same shape"
        )
    dtype = torch.promote_types(torch.promote_types(log_prob.dtype, old_log_prob.dtype), torch.float32)
    ratio = torch.exp(log_prob.to(dtype) - old_log_prob.to(dtype))
    adv = advantages.detach().to(dtype)
    low, high = 1.0 - clip_range, 1.0 + high
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(low, high))
    clipped = (ratio < low) | (ratio > high)
    return loss, ratio, clipped


def kl_penalty(kind: KLType, policy: Tensor, reference: Tensor, std: Tensor | float) -> Tensor:
    """Per-sample KL penalty mean((policy − reference)²)/(2·s² + 1e-7), (B,).

    - ``"v-based"``: policy = v_θ, reference = v_ref (the velocities of the policy and the frozen
      reference DiT at the same x_t);
    - ``"x-based"``: policy = μ_θ, reference = μ_ref (the step means from `sde_step_with_logprob`).
      For two Gaussians with the same std this is the exact KL per element.

    The mean runs over all non-batch dims (C, H, W). s is the sampler's noise scale, the ``std``
    returned by `sde_step_with_logprob` ((B,) tensor or a float). The 1e-7 keeps deterministic steps
    (s = 0) finite; the trainer does not train on them.

    Args:
        kind: one of ``KL_TYPES``.
        policy: (B, C, H, W), carries the gradient.
        reference: (B, C, H, W), no gradient needed.
        std: (B,) or float.

    Returns:
        (B,) in at least float32.
    """
    if kind not in KL_TYPES:
        raise ValueError(f"unknown KL type {kind!r}; valid types: {', '.join(KL_TYPES)}")
    if policy.shape != reference.shape:
        raise ValueError(f"policy shape {tuple(policy.shape)} != reference shape {tuple(reference.shape)}")
    # Both kinds share the formula; the kind only says which tensors the caller passes. Dispatching on
    # it still catches a typo in the config here, at the first step, with the list of valid names.
    dtype = torch.promote_types(policy.dtype, torch.float32)
    mse = _per_sample_mean((policy.to(dtype) - reference.detach().to(dtype)).square())
    s = torch.as_tensor(std, dtype=dtype, device=policy.device).detach()
    if s.ndim > 0:
        if s.numel() != policy.shape[0]:
            raise ValueError(f"std must be a float or a ({policy.shape[0]},) tensor, got shape {tuple(s.shape)}")
        s = s.reshape(-1)
    return mse / (2 * s.square() + _KL_STD_FLOOR)


def flow_matching_inputs(latents: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """Noised latents x_σ = (1 − σ)·z + σ·ε for the SFT auxiliary loss.

    Args:
        latents: z, (B, C, H, W) (VAE latents after scale and shift).
        noise: ε ~ N(0, I), same shape.
        sigma: (B,) tensor or float in [0, 1] (drawn from the shifted training schedule).

    Returns:
        (B, C, H, W) in at least float32.
    """
    if latents.shape != noise.shape:
        raise ValueError(f"latents shape {tuple(latents.shape)} != noise shape {tuple(noise.shape)}")
    dtype = torch.promote_types(latents.dtype, torch.float32)
    s = _per_sample_view(torch.as_tensor(sigma, dtype=dtype, device=latents.device), latents)
    return torch.lerp(latents.to(dtype), noise.to(dtype), s)


def flow_matching_loss(velocity_pred: Tensor, latents: Tensor, noise: Tensor) -> Tensor:
    """Flow-matching (SFT) loss: per-sample MSE between the predicted velocity and ε − z, (B,).

    The target is the constant velocity of the straight path x_σ = (1 − σ)z + σε, d x_σ/dσ = ε − z.
    Per-sample rather than scalar so that the caller can weight or mask samples; ``.mean()`` gives
    the usual scalar loss.

    Args:
        velocity_pred: (B, C, H, W) model output at x_σ (`flow_matching_inputs`).
        latents: z, (B, C, H, W).
        noise: ε, (B, C, H, W).

    Returns:
        (B,) in at least float32.
    """
    if not velocity_pred.shape == latents.shape == noise.shape:
        raise ValueError(
            f"velocity_pred {tuple(velocity_pred.shape)}, latents {tuple(latents.shape)} and noise "
            f"{tuple(noise.shape)} must have the same shape"
        )
    dtype = torch.promote_types(velocity_pred.dtype, torch.float32)
    target = noise.detach().to(dtype) - latents.detach().to(dtype)
    return _per_sample_mean((velocity_pred.to(dtype) - target).square())


def approx_kl(log_prob: Tensor, old_log_prob: Tensor) -> Tensor:
    """½·mean((log p − log p_old)²), the usual estimator of KL(old ‖ new) for logging: 0-d tensor.

    Computed without gradient, in at least float32.
    """
    dtype = torch.promote_types(torch.promote_types(log_prob.dtype, old_log_prob.dtype), torch.float32)
    diff = log_prob.detach().to(dtype) - old_log_prob.detach().to(dtype)
    return 0.5 * diff.square().mean()


def _per_sample_mean(t: Tensor) -> Tensor:
    return t.mean(dim=tuple(range(1, t.ndim)))


def _per_sample_view(s: Tensor, like: Tensor) -> Tensor:
    """0-d or (B,) → broadcastable against like (B, C, H, W)."""
    if s.ndim == 0:
        return s
    if s.numel() != like.shape[0]:
        raise ValueError(f"sigma must be a float or a ({like.shape[0]},) tensor, got shape {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (like.ndim - 1)))
