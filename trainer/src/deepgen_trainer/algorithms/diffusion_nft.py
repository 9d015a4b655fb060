"""DiffusionNFT (arXiv 2509.16117; NVlabs/DiffusionNFT): policy improvement on the forward process.

The rollout only supplies clean images x0 (any solver; the trainer uses the deterministic ODE with one
initial noise per image) and their rewards. Training is flow matching on freshly noised copies of the
*final* clean latent, x_t = (1 − t)·x0 + t·ε, with two implicit policies built from the trained
velocity v_θ and the sampling policy's v_old (no gradient):

    v⁺ = β·v_θ + (1 − β)·v_old        (the positive policy: where good samples should pull)
    v⁻ = (1 + β)·v_old − β·v_θ        (the negative policy: the mirror image through v_old)
    x̂0^± = x_t − t·v^±,   w^± = stop-grad mean|x̂0^± − x0|  (adaptive weights)
    L = [r·‖x̂0⁺ − x0‖²/w⁺ + (1 − r)·‖x̂0⁻ − x0‖²/w⁻] / β     (‖·‖² averaged over C·H·W)

with the optimality probability r = ½ + ½·clip(A/a, −1, 1) ∈ [0, 1] from the advantage A (per-prompt
mean, global std). r = 1 regresses v⁺ onto the sample, r = 0 pushes v⁻ onto it (v_θ away from it);
r = ½ with v_θ = v_old has zero gradient. The KL to the reference is mean((v_θ − v_ref)²), without
a variance divisor (the original divided by a placeholder std of 0.1, 50× the paper's scale).

The original trainer regressed towards the next trajectory state x_{j+1} from the rollout's own x_j
instead of the final clean latent from fresh noise, and (with its defaults) rolled out a group from one
shared noise through a deterministic sampler, so a group's images were identical and r = ½ everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from deepgen_trainer.algorithms.policy_loss import flow_matching_inputs

DecaySchedule = Literal[1, 2]
DECAY_SCHEDULES: tuple[int, ...] = get_args(DecaySchedule)
# w^± below this is clamped: a sample whose x0 is predicted exactly would divide by 0.
_MIN_WEIGHT = 1e-5


@dataclass(frozen=True)
class NftLoss:
    """Per-sample outputs of `nft_loss`, each (B,): the loss (with gradient) and its positive and
    negative parts ‖x̂0^± − x0‖²/w^± (for the metrics)."""

    loss: Tensor
    positive: Tensor
    negative: Tensor


def optimality_probability(advantages: Tensor, adv_clip: float) -> Tensor:
    """r = ½ + ½·clip(A/a, −1, 1), (B,) in [0, 1], no gradient. ``adv_clip`` is a > 0
    (``--atrain_nft_adv_clip_range``)."""
    if not adv_clip > 0:
        raise ValueError(f"adv_clip must be > 0, got {adv_clip}")
    adv = advantages.detach().to(torch.promote_types(advantages.dtype, torch.float32))
    return 0.5 + 0.5 * (adv / adv_clip).clamp(-1.0, 1.0)


def forward_noised(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """x_t = (1 − t)·x0 + t·ε on the clean latent x0 (B, C, H, W); t a float or (B,)."""
    return flow_matching_inputs(x0, noise, t)


def nft_loss(
    velocity: Tensor, old_velocity: Tensor, x_t: Tensor, x0: Tensor, t: Tensor | float, r: Tensor, beta: float
) -> NftLoss:
    """DiffusionNFT's per-sample loss (see the module docstring).

    Args:
        velocity: v_θ at (x_t, t), (B, C, H, W), carries the gradient.
        old_velocity: v_old at (x_t, t), same shape; treated as a constant.
        x_t: the forward-noised latent, (B, C, H, W).
        x0: the clean latent it was noised from, (B, C, H, W).
        t: the noise level, a float or (B,) in (0, 1].
        r: (B,) optimality probabilities in [0, 1].
        beta: β > 0 (``--atrain_nft_beta``), how far the implicit policies sit from v_old.

    Returns:
        `NftLoss` of (B,) tensors in at least float32.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not velocity.shape == old_velocity.shape == x_t.shape == x0.shape:
        raise ValueError(
            f"velocity {tuple(velocity.shape)}, old_velocity {tuple(old_velocity.shape)}, x_t {tuple(x_t.shape)} and "
            f"x0 {tuple(x0.shape)} must have the same shape"
        )
    dtype = torch.promote_types(velocity.dtype, torch.float32)
    v, v_old = velocity.to(dtype), old_velocity.detach().to(dtype)
    x_t, x0 = x_t.detach().to(dtype), x0.detach().to(dtype)
    tt = _per_sample(torch.as_tensor(t, dtype=dtype, device=v.device), v)
    positive = _weighted_error(x_t - tt * (beta * v + (1 - beta) * v_old), x0)
    negative = _weighted_error(x_t - tt * ((1 + beta) * v_old - beta * v), x0)
    r = r.detach().to(dtype)
    return NftLoss(
        loss=(r * positive + (1 - r) * negative) / beta, positive=positive.detach(), negative=negative.detach()
    )


def velocity_kl(velocity: Tensor, reference: Tensor) -> Tensor:
    """DiffusionNFT's KL penalty mean((v_θ − v_ref)²) per sample, (B,), no variance divisor."""
    if velocity.shape != reference.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} != reference shape {tuple(reference.shape)}")
    dtype = torch.promote_types(velocity.dtype, torch.float32)
    diff = velocity.to(dtype) - reference.detach().to(dtype)
    return diff.square().mean(dim=tuple(range(1, diff.ndim)))


def old_policy_decay(step: int, schedule: DecaySchedule = 1) -> float:
    """The sampling policy's soft-update decay d after training step ``step`` (1-based):
    v_old ← d·v_old + (1 − d)·v_θ. The paper's schedules (the authors' ``return_decay``):
    1: d = min(0.001·step, 0.5), the sampling policy trails the trained one more and more;
    2: d = 0 for 75 steps (v_old = v_θ), then min(0.0075·(step − 75), 0.999)."""
    if schedule == 1:
        return min(0.001 * step, 0.5)
    if schedule == 2:
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    raise ValueError(f"unknown decay schedule {schedule!r}; valid schedules: {', '.join(map(str, DECAY_SCHEDULES))}")


def _weighted_error(x0_pred: Tensor, x0: Tensor) -> Tensor:
    """‖x̂0 − x0‖²/w per sample with w = stop-grad mean|x̂0 − x0| (clamped ≥ 1e-5); the weight is
    computed in float64, as the authors do, so tiny errors do not round to the clamp."""
    dims = tuple(range(1, x0.ndim))
    err = x0_pred - x0
    weight = err.detach().double().abs().mean(dim=dims).clamp_min(_MIN_WEIGHT).to(err.dtype)
    return err.square().mean(dim=dims) / weight


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """0-d or (B,) → broadcastable against like (B, C, H, W)."""
    if t.ndim == 0:
        return t
    if t.numel() != like.shape[0]:
        raise ValueError(f"t must be a float or a ({like.shape[0]},) tensor, got shape {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))
