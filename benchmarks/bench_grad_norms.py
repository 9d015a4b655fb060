"""`make bench-grad-norms`: what ``--log_component_grad_norm`` costs a measured step, on CPU.

1. Training passes of the real DiT architecture at its real width (SD3.5-Medium: 1536 wide, 24
   heads; `--layers` of its blocks, dual attention as in its first layers) on `--batch` 512×512 latents,
   gradient checkpointing on as in training, float32. The policy and β·KL pieces share the velocity's
   forward (the clipped-ratio surrogate on the Gaussian step log-probability, and the squared distance to
   a frozen reference velocity). `--passes` passes make one timed step (a measured step zeroes its
   sums once and takes their norms once), the variants interleaved in rounds:
   - `one backward of the sum (baseline)`: an unmeasured pass;
   - `measured: one batched backward`: `GradParts.measure` (both pieces' gradients in one backward pass)
     plus the updater's backward of `gradient_loss`, as a measured pass runs here;
   - `split: one backward per piece`: the original's way (a backward call per piece, the first keeping
     the graph), which under DeepSpeed doubles the micro-steps.
   Median seconds per step and the median paired ratio to the baseline. (vmap's batched backward is a
   CPU's worst case: its batching rules move data around that a GPU's batched kernels may not; `make
   gpu-smoke` checks there that no operation falls back to a loop over the pieces.)
2. Memory a measured step adds at DeepGen's real DiT size (2.2 B trainable weights), counted: one float32
   sum per part, plus the pieces' gradients in the weights' dtype while a pass runs.

Usage: `make bench-grad-norms` (or `python benchmarks/bench_grad_norms.py --layers 2 --passes 3 --rounds 5`).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import SD3Transformer2DModel

from deepgen_trainer.observe.flops import DeepGenShape
from deepgen_trainer.observe.grad_norms import PARTS, GradParts

GIB = 2**30
BASELINE = "one backward of the sum (baseline)"
MEASURED = "measured: one batched backward"
SPLIT = "split: one backward per piece"
TEXT_TOKENS = 128 + 48  # think tokens + a templated prompt


def build_dit(layers: int, heads: int) -> SD3Transformer2DModel:
    """SD3.5-Medium's DiT with `layers` blocks and `heads` attention heads of 64 (24: its real width)."""
    dit = dataclasses.replace(
        DeepGenShape().dit, num_layers=layers, dual_attention_layers=tuple(range(min(layers, 13))),
        num_attention_heads=heads, caption_projection_dim=64 * heads,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**dit.kwargs())
    model.enable_gradient_checkpointing()
    return model.train()


def make_pass(dit: SD3Transformer2DModel, batch: int) -> Callable[[], list[tuple[str, torch.Tensor]]]:
    """A pass's forward: (name, loss) of the policy and β·KL pieces, one velocity forward shared."""
    g = torch.Generator().manual_seed(1)
    cfg = dit.config
    latent = cfg.sample_size // 2  # 512×512 images: 64×64 latents
    x = torch.randn((batch, cfg.in_channels, latent, latent), generator=g)
    x_next = x + 0.05 * torch.randn(x.shape, generator=g)
    text = torch.randn((batch, TEXT_TOKENS, cfg.joint_attention_dim), generator=g)
    pooled = torch.randn((batch, cfg.pooled_projection_dim), generator=g)
    timestep = torch.full((batch,), 500.0)
    advantages = torch.randn(batch, generator=g)
    with torch.no_grad():  # the frozen reference's velocity, and the stored log-probabilities
        v_ref = dit(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep).sample
    sigma, dt, std = 0.5, -0.05, 0.1

    def log_prob(v: torch.Tensor) -> torch.Tensor:
        mean = x + v * dt
        return -((x_next - mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2)

    old = log_prob(v_ref)

    def forward() -> list[tuple[str, torch.Tensor]]:
        v = dit(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep).sample
        ratio = torch.exp(log_prob(v) - old)
        policy = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - 1e-4, 1 + 1e-4)).mean()
        kl = ((v - v_ref) ** 2).mean() / (2 * sigma**2)
        return [("policy", policy), ("beta_kl", 0.01 * kl)]

    return forward


def time_steps(dit: SD3Transformer2DModel, batch: int, passes: int, rounds: int) -> dict[str, list[float]]:
    """Seconds of `passes` passes (one optimizer step's worth) per variant and round."""
    forward = make_pass(dit, batch)
    parts = GradParts([p for p in dit.parameters() if p.requires_grad])

    def baseline() -> None:
        for _ in range(passes):
            pieces = forward()
            (pieces[0][1] + pieces[1][1]).backward()

    def measured() -> None:
        parts.start()
        for _ in range(passes):
            parts.measure(forward()).backward()
        parts.finish()

    def split() -> None:
        for _ in range(passes):
            pieces = forward()
            pieces[0][1].backward(retain_graph=True)
            pieces[1][1].backward()

    variants = {BASELINE: baseline, MEASURED: measured, SPLIT: split}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):  # the first round warms up
        for name, run in variants.items():
            dit.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            run()
            if r:
                seconds[name].append(time.perf_counter() - t0)
    return seconds


def measured_step_gib(trainable: int, bytes_per_weight: int) -> tuple[float, float]:
    """(float32 sums of the three parts, the two pieces' gradients in flight) in GiB."""
    return len(PARTS) * 4 * trainable / GIB, 2 * bytes_per_weight * trainable / GIB


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="DiT blocks (default 1)")
    parser.add_argument("--heads", type=int, default=24, help="attention heads of 64 (default 24: the real width)")
    parser.add_argument("--batch", type=int, default=2, help="images per training micro-batch (default 2)")
    parser.add_argument("--passes", type=int, default=3, help="passes of one timed step (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up (default 3)")
    args = parser.parse_args(argv)
    dit = build_dit(args.layers, args.heads)
    n = sum(p.numel() for p in dit.parameters())
    print(f"DiT: {args.layers} blocks of width {64 * args.heads}, {n / 1e6:.0f} M weights, float32, gradient "
          f"checkpointing; {args.batch} images of 512×512 per pass, {args.passes} passes per step; "
          f"{args.rounds} rounds")  # fmt: skip
    seconds = time_steps(dit, args.batch, args.passes, args.rounds)
    base = seconds[BASELINE]
    print(f"\n| {args.passes} passes | median s | median ratio to the baseline |\n|---|---:|---:|")
    for name, times in seconds.items():
        ratio = statistics.median(t / b for t, b in zip(times, base, strict=True))
        print(f"| {name} | {statistics.median(times):.2f} | {ratio:.2f} |")
    with torch.device("meta"):  # counted, not allocated
        trainable = sum(p.numel() for p in SD3Transformer2DModel(**DeepGenShape().dit.kwargs()).parameters())
    sums, in_flight = measured_step_gib(trainable, 2)
    print(f"\nMemory a measured step adds at DeepGen's DiT ({trainable / 1e9:.2f} B weights, bf16): "
          f"{sums:.1f} GiB of float32 part sums + {in_flight:.1f} GiB of bf16 piece gradients during a pass "
          f"(memory_table.py counts the default step without them).")  # fmt: skip
    return seconds


if __name__ == "__main__":
    main()
