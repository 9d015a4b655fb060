"""How much each SDE step weighs in the policy gradient and the KL penalty, with and without a floor
on the std that scores a transition (`sde_step_with_logprob(..., min_std=)`, `--logprob_min_std`).

For each sampler and grid (the tiny model's scheduler, 8 and 50 steps), one trajectory of 16 latents
is sampled with random velocities; at every trained step (all but the last) it reports the norm of
∂(Σ log p)/∂v of the exact log-prob and the v-based KL for a fixed velocity error of 0.01, then
prints: the share of the step before the last in the summed gradient norms (an even share is
1/(steps − 1)), the largest step's gradient over the median step's, and the KL of the step before
the last over the median step's KL. cps_sde's std is σ', and the grid's last positive σ' is the
scheduler's smallest sigma (0.0089), so without a floor that one step dominates both.

Usage: `python benchmarks/bench_logprob_scale.py` (a few seconds).
"""

from __future__ import annotations

import statistics

import torch

from deepgen_trainer.algorithms.policy_loss import kl_penalty
from deepgen_trainer.algorithms.sde import LOGPROB_MIN_STD, SAMPLERS, sde_step_with_logprob
from deepgen_trainer.model.tiny import build_tiny

FLOORS = (0.0, 0.02, 0.05, LOGPROB_MIN_STD)


def per_step(sigmas: list[float], sampler: str, min_std: float) -> tuple[list[float], list[float]]:
    """(gradient norm, KL) of every trained step of one trajectory."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, 8, 8, generator=g)
    grads, kls = [], []
    for i in range(len(sigmas) - 2):
        v = torch.randn(x.shape, generator=g).requires_grad_()
        x_next, *_ = sde_step_with_logprob(sampler, v.detach(), x, sigmas[i], sigmas[i + 1], 1.0, generator=g)
        _, log_prob, _, std = sde_step_with_logprob(
            sampler, v, x, sigmas[i], sigmas[i + 1], 1.0, prev_sample=x_next, exact_logprob=True, min_std=min_std
        )
        log_prob.sum().backward()
        grads.append(v.grad.norm().item())
        kls.append(kl_penalty("v-based", v.detach() + 0.01, v.detach(), std).mean().item())
        x = x_next
    return grads, kls


def main() -> None:
    model = build_tiny()
    print(f"{'sampler':<13} {'steps':>5} {'min_std':>7} {'last share':>10} {'even':>6} {'max/median grad':>15} "
          f"{'KL last/median':>14}")  # fmt: skip
    for sampler in SAMPLERS:
        for steps in (8, 50):
            sigmas = model.sigmas(steps).tolist()
            for floor in FLOORS:
                grads, kls = per_step(sigmas, sampler, floor)
                print(
                    f"{sampler:<13} {steps:>5} {floor:>7.3g} {grads[-1] / sum(grads):>10.1%} {1 / len(grads):>6.1%} "
                    f"{max(grads) / statistics.median(grads):>15.1f} {kls[-1] / statistics.median(kls):>14.3g}"
                )
    print(f"default floor LOGPROB_MIN_STD = {LOGPROB_MIN_STD}")


if __name__ == "__main__":
    main()
