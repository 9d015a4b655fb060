"""Rollout sampler overhead: one SDE step with its log-prob against a plain Euler step.

Times each variant on a (32, 16, 64, 64) float32 latent batch (32 images of 512² after the VAE's
8x downsampling) in interleaved rounds, so background load hits every variant alike, and prints the
best round as a ratio to the Euler baseline measured in the same run.

Usage: `make bench-sde` (or `python benchmarks/bench_sde.py --rounds 10 --iters 30`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from deepgen_trainer.algorithms.sde import ode_step, sde_step_with_logprob


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(32, 16, 64, 64)
    v = torch.randn_like(x)
    stored = torch.randn_like(x)
    g = torch.Generator().manual_seed(0)
    sigma, sigma_next, dt = 0.5, 0.48, -0.02
    variants: dict[str, Callable[[], object]] = {
        "euler x + v*dt (baseline)": lambda: x + v * dt,
        "ode_step": lambda: ode_step(v, x, sigma, sigma_next),
        "euler + gaussian noise": lambda: x + v * dt + 0.1 * torch.randn(x.shape, generator=g),
        "cps_sde, sample": lambda: sde_step_with_logprob("cps_sde", v, x, sigma, sigma_next, 1.0, generator=g),
        "cps_sde, score stored step": lambda: sde_step_with_logprob(
            "cps_sde", v, x, sigma, sigma_next, 1.0, prev_sample=stored
        ),
        "flowgrpo_sde, sample": lambda: sde_step_with_logprob(
            "flowgrpo_sde", v, x, sigma, sigma_next, 1.0, generator=g
        ),
        "dance_sde, sample": lambda: sde_step_with_logprob("dance_sde", v, x, sigma, sigma_next, 1.0, generator=g),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            step()
            start = time.perf_counter()
            for _ in range(args.iters):
                step()
            times[name].append((time.perf_counter() - start) / args.iters)

    base = min(times["euler x + v*dt (baseline)"])
    noisy = min(times["euler + gaussian noise"])
    print(
        f"latents {tuple(x.shape)} float32, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds x {args.iters} iterations; best round shown"
    )
    print(f"{'variant':<30} {'ms':>8} {'median ms':>10} {'vs euler':>9} {'vs euler+noise':>15}")
    for name, samples in times.items():
        best = min(samples)
        print(
            f"{name:<30} {best * 1e3:8.2f} {statistics.median(samples) * 1e3:10.2f} {best / base:8.1f}x "
            f"{best / noisy:14.2f}x"
        )
    print(
        "\nDrawing the noise dominates on CPU; a full rollout step is dominated by the DiT forward, which this "
        "benchmark leaves out."
    )


if __name__ == "__main__":
    main()
