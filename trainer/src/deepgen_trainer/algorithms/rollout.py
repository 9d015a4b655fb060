"""Sampling from the DeepGen policy: SDE rollouts that keep what GRPO trains on, and ODE sampling
for evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from deepgen_trainer.algorithms.sde import Sampler, ode_step, sde_step_with_logprob


class VelocityModel(Protocol):
    """What sampling needs of a model (`deepgen_trainer.model.deepgen.DeepGen` is one): the velocity
    v (B, C, h, w) float32 at `latents` and noise level `sigma`, for a conditioning the model built
    itself, optionally with classifier-free guidance against `uncond`."""

    def velocity(
        self, latents: Tensor, sigma: float, cond: Any, cfg_scale: float = 0.0, uncond: Any = None
    ) -> Tensor: ...


@dataclass(frozen=True)
class Trajectory:
    """A batch of B rollouts over T steps of the sigma grid.

    latents: (T + 1, B, C, h, w) float32, x at every grid point (latents[0] the initial noise).
    log_probs: (T, B) float32, log p of each transition under the sampling policy (the "old" log-probs).
    sigmas: (T + 1,) float32, the grid from 1 to 0.
    means: (len(keep_means), B, C, h, w) float32, the step means μ_old of the steps `sde_rollout` was
        asked to keep (in that order; GRPO-Guard's RatioNorm needs them), or None.
    """

    latents: Tensor
    log_probs: Tensor
    sigmas: Tensor
    means: Tensor | None = None

    @property
    def final(self) -> Tensor:
        return self.latents[-1]


@torch.no_grad()
def sde_rollout(
    model: VelocityModel,
    noise: Tensor,
    cond: Any,
    sigmas: Tensor,
    sampler: Sampler,
    eta: float,
    *,
    cfg_scale: float = 0.0,
    uncond: Any = None,
    generator: torch.Generator | None = None,
    exact_logprob: bool = False,
    min_std: float = 0.0,
    keep_means: Sequence[int] = (),
) -> Trajectory:
    """Sample x from `noise` (B, C, h, w) down the `sigmas` grid with the SDE `sampler`, recording the
    latents and log-probs in float32 (old log-probs must not be rounded: see policy_loss), and the
    step means of the step indices in `keep_means`. `exact_logprob` and `min_std` as in
    `sde_step_with_logprob`; the update must pass the same."""
    x = noise.float()
    latents, log_probs, means = [x], [], {}
    for i in range(len(sigmas) - 1):
        v = model.velocity(x, sigmas[i].item(), cond, cfg_scale, uncond)
        x, log_prob, mean, _ = sde_step_with_logprob(
            sampler, v, x, sigmas[i].item(), sigmas[i + 1].item(), eta, generator=generator,
            exact_logprob=exact_logprob, min_std=min_std,
        )  # fmt: skip
        latents.append(x)
        log_probs.append(log_prob)
        if i in keep_means:
            means[i] = mean
    kept = torch.stack([means[i] for i in keep_means]) if keep_means else None
    return Trajectory(torch.stack(latents), torch.stack(log_probs), sigmas, kept)


@torch.no_grad()
def ode_sample(model: VelocityModel, noise: Tensor, cond: Any, sigmas: Tensor, cfg_scale: float, uncond: Any) -> Tensor:
    """The deterministic Euler sampler of evaluation: final latents (B, C, h, w) float32."""
    x = noise.float()
    for i in range(len(sigmas) - 1):
        v = model.velocity(x, sigmas[i].item(), cond, cfg_scale, uncond)
        x = ode_step(v, x, sigmas[i].item(), sigmas[i + 1].item())
    return x
