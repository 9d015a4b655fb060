"""Sampling from the DeepGen policy: SDE rollouts that keep what GRPO trains on, and ODE sampling
for evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepgen_trainer.model import Conditioning, DeepGen
from deepgen_trainer.sde import Sampler, ode_step, sde_step_with_logprob


@dataclass(frozen=True)
class Trajectory:
    """A batch of B rollouts over T steps of the sigma grid.

    latents: (T + 1, B, C, h, w) float32, x at every grid point (latents[0] the initial noise).
    log_probs: (T, B) float32, log p of each transition under the sampling policy (the "old" log-probs).
    sigmas: (T + 1,) float32, the grid from 1 to 0.
    """

    latents: Tensor
    log_probs: Tensor
    sigmas: Tensor

    @property
    def final(self) -> Tensor:
        return self.latents[-1]


@torch.no_grad()
def sde_rollout(
    model: DeepGen,
    noise: Tensor,
    cond: Conditioning,
    sigmas: Tensor,
    sampler: Sampler,
    eta: float,
    *,
    cfg_scale: float = 0.0,
    uncond: Conditioning | None = None,
    generator: torch.Generator | None = None,
    exact_logprob: bool = False,
    min_std: float = 0.0,
) -> Trajectory:
    """Sample x from `noise` (B, C, h, w) down the `sigmas` grid with the SDE `sampler`, recording the
    latents and log-probs in float32 (old log-probs must not be rounded: see policy_loss).
    `exact_logprob` and `min_std` as in `sde_step_with_logprob`; the update must pass the same."""
    x = noise.float()
    latents, log_probs = [x], []
    for i in range(len(sigmas) - 1):
        v = model.velocity(x, sigmas[i].item(), cond, cfg_scale, uncond)
        x, log_prob, _, _ = sde_step_with_logprob(
            sampler, v, x, sigmas[i].item(), sigmas[i + 1].item(), eta, generator=generator,
            exact_logprob=exact_logprob, min_std=min_std,
        )  # fmt: skip
        latents.append(x)
        log_probs.append(log_prob)
    return Trajectory(torch.stack(latents), torch.stack(log_probs), sigmas)


@torch.no_grad()
def ode_sample(
    model: DeepGen, noise: Tensor, cond: Conditioning, sigmas: Tensor, cfg_scale: float, uncond: Conditioning | None
) -> Tensor:
    """The deterministic Euler sampler of evaluation: final latents (B, C, h, w) float32."""
    x = noise.float()
    for i in range(len(sigmas) - 1):
        v = model.velocity(x, sigmas[i].item(), cond, cfg_scale, uncond)
        x = ode_step(v, x, sigmas[i].item(), sigmas[i + 1].item())
    return x
