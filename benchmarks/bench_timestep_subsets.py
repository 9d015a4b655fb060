"""Does drawing the trained timesteps per sample, instead of one subset for the whole batch, lower the
variance of the policy gradient?

One rollout of the tiny DeepGen (4 prompts × 8 images, `--num_inference_steps` SDE steps) with fixed
advantages; the policy-loss gradient over `int(steps · fraction)` trained timesteps is computed for
`--draws` random subsets, either shared by the batch (the default loop) or drawn independently per
sample (with per-sample sigmas in one pass per slot). The spread of those gradients around their mean
(the trace of their covariance, i.e. the mean squared distance to the mean gradient) is the variance
the timestep subsampling adds; both estimators have the same expectation (the full-timestep
gradient, also computed), so the ratio of their variances is the gain.

Usage: `python benchmarks/bench_timestep_subsets.py [--draws 24] [--steps 10] [--fraction 0.6]`.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from deepgen_trainer.algorithms.policy_loss import clipped_policy_loss
from deepgen_trainer.algorithms.rollout import sde_rollout
from deepgen_trainer.algorithms.sde import LOGPROB_MIN_STD, sde_step_with_logprob
from deepgen_trainer.model.tiny import TINY_IMAGE_SIZE, build_tiny

PROMPTS = ["a red cat on a mat", "a sign that says OPEN", "mountains at sunset", "two apples and a tree"]


def flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    grad = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
    for p in params:
        p.grad = None
    return grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10, help="SDE steps of the rollout")
    parser.add_argument("--fraction", type=float, default=0.6, help="--timestep_fraction")
    parser.add_argument("--sampler", default="cps_sde")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = build_tiny()
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    n, group = len(PROMPTS) * 8, 8
    with torch.no_grad():
        cond = model.encode_prompts(PROMPTS).repeat_interleave(group)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn((len(PROMPTS), *model.latent_shape(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)), generator=g)
    sigmas = model.sigmas(args.steps)
    traj = sde_rollout(
        model, noise.repeat_interleave(group, 0), cond, sigmas, args.sampler, 1.0, generator=g,
        min_std=LOGPROB_MIN_STD,
    )  # fmt: skip
    advantages = torch.randn(n, generator=g)
    candidates = len(sigmas) - 2  # never the deterministic last step
    m = int(args.steps * args.fraction)
    rows = torch.arange(n)

    def gradient(slots: torch.Tensor) -> torch.Tensor:
        """Gradient of the mean policy loss over the (m, n) timestep indices `slots`."""
        for idx in slots:
            x, x_next = traj.latents[idx, rows], traj.latents[idx + 1, rows]
            sigma, sigma_next = sigmas[idx], sigmas[idx + 1]
            v = model.velocity(x, sigma, cond)
            _, log_prob, _, _ = sde_step_with_logprob(
                args.sampler, v, x, sigma, sigma_next, 1.0, prev_sample=x_next, min_std=LOGPROB_MIN_STD
            )
            loss, _, _ = clipped_policy_loss(log_prob, traj.log_probs[idx, rows], advantages, 1e-4)
            (loss.mean() / len(slots)).backward()
        return flat_grad(params)

    model.train()
    full = gradient(torch.arange(candidates)[:, None].expand(candidates, n))
    results = {}
    for mode in ("shared", "per_sample"):
        grads = []
        for d in range(args.draws):
            gen = torch.Generator().manual_seed(100 + d)
            if mode == "shared":
                slots = torch.randperm(candidates, generator=gen)[:m, None].expand(m, n)
            else:
                slots = torch.stack([torch.randperm(candidates, generator=gen)[:m] for _ in range(n)], dim=1)
            grads.append(gradient(slots))
        stacked = torch.stack(grads)
        mean = stacked.mean(0)
        variance = (stacked - mean).square().sum(1).mean().item()
        bias = (mean - full).norm().item() / full.norm().item()
        results[mode] = variance
        print(
            f"{mode:<11} {m} of {candidates} timesteps, {args.draws} draws: variance (trace) {variance:.4e}, "
            f"|mean - full| / |full| {bias:.3f}"
        )
    print(f"per-sample / shared variance: {results['per_sample'] / results['shared']:.3f}  (|full gradient|² "
          f"{full.square().sum().item():.4e}; {args.sampler}, {args.steps} SDE steps)")  # fmt: skip


if __name__ == "__main__":
    main()
