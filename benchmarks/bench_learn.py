"""Compute to reward: which update rule buys a reward gain for the least compute (`make bench-learn`).

The tiny DeepGen on CPU trains against the served brightness reward (`python -m
deepgen_trainer.demo_reward`, over gRPC, as `make demo-learn`) with each algorithm, for several seeds:
flowgrpo (cps_sde), grpoguard (cps_sde, exact log-density), diffusionnft (ODE rollout, on-policy)
and flowgrpo with --one_step_off_policy. Every run has the same batch (2 prompts × 4 images, 4 steps,
2 trained) and learning rate. Per run, its model FLOPs per step come from the analytic count of
benchmarks/flops.py on the tiny model's shapes (PaLM's model FLOPs: no gradient-checkpointing
recompute; DiffusionNFT off-policy adds the sampling copy's forward per trained step), its wall time
per step from its metrics.

The gain: the smoothed reward (running mean of 3 steps) reaching the run's first-step reward +
`--gain`. Printed per algorithm: the steps, cumulative model FLOPs and wall seconds to reach it
(median and [min, max] over the seeds that reached it; "-" where fewer than half did), their ratios
to flowgrpo's medians, and the reward gained by the end. Curves: `--out`/curves.png (reward against
cumulative FLOPs and against wall time, one line per seed).

Usage: `python benchmarks/bench_learn.py [--seeds 12] [--steps 20] [--gain 0.01] [--variants a,b]`.
The default (48 runs of 20 steps) takes about 1.5 minutes on an idle 2-core machine; one seed's outcome
is mostly noise at this size, so compare the seeds that reach the gain and the medians, over many seeds.
Not a timed test: the figures go in the README's performance section, whatever they are.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.*` when run as a script

from benchmarks.bench_train import reward_service  # noqa: E402
from benchmarks.flops import DeepGenShape, DitShape, StepShape, VaeShape, VlmShape, model_flops, step_flops  # noqa: E402
from deepgen_trainer.config import TrainConfig, parse_args  # noqa: E402
from deepgen_trainer.model.deepgen import DeepGen  # noqa: E402
from deepgen_trainer.model.tiny import TINY_IMAGE_SIZE, build_tiny  # noqa: E402
from deepgen_trainer.train import train  # noqa: E402

# The learning test's setting (tests/trainer/test_learning.py): a trend within 20 steps of the tiny model.
BASE = [
    "--model", "tiny", "--report_to", "none", "--no-bf16", "--deepspeed", "none", "--rollout_n", "4",
    "--prompts_per_rank", "2", "--rollout_micro_batch_size", "4", "--atrain_micro_batch_size", "8",
    "--num_inference_steps", "4", "--timestep_fraction", "0.5", "--image_height", str(TINY_IMAGE_SIZE),
    "--image_width", str(TINY_IMAGE_SIZE), "--learning_rate", "2e-2", "--clip_range", "0.2", "--warmup_steps", "0",
    "--beta", "0", "--save_steps", "1000", "--reward_ready_timeout", "60",
]  # fmt: skip
VARIANTS: dict[str, list[str]] = {
    "flowgrpo": [],
    "grpoguard": ["--atrain_algorithm", "grpoguard"],
    "diffusionnft": ["--atrain_algorithm", "diffusionnft"],
    "flowgrpo-1-off": ["--one_step_off_policy"],
    "diffusionnft-off": ["--atrain_algorithm", "diffusionnft", "--atrain_nft_off_policy"],
}
DEFAULT_VARIANTS = ("flowgrpo", "grpoguard", "diffusionnft", "flowgrpo-1-off")
SMOOTH = 3
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


@dataclass
class Curve:
    rewards: list[float]
    flops: list[float]  # cumulative model FLOPs after each step
    seconds: list[float]  # cumulative wall seconds after each step


def tiny_shape(model: DeepGen) -> DeepGenShape:
    """The analytic FLOP model's shapes of the tiny DeepGen, read off the built model."""
    dit = model.transformer.config
    text = model.lmm.config.text_config
    vae = model.vae.config
    return DeepGenShape(
        dit=DitShape(**{f.name: _tuple(dit[f.name]) for f in dataclasses.fields(DitShape)}),
        vlm=VlmShape(**{f.name: getattr(text, f.name) for f in dataclasses.fields(VlmShape)}),
        vae=VaeShape(**{f.name: _tuple(vae[f.name]) for f in dataclasses.fields(VaeShape)}),
        deepgen=model.config,
    )


def flops_per_step(cfg: TrainConfig, shape: DeepGenShape) -> float:
    """Model FLOPs of one step of `cfg` (no SFT-aux), plus the sampling copy's forward per trained
    image and step for DiffusionNFT off-policy."""
    step = StepShape.from_train_config(cfg, sftaux=False)
    parts = step_flops(step, shape)
    extra = 0.0
    if cfg.atrain_algorithm == "diffusionnft" and cfg.atrain_nft_off_policy:
        extra = parts["update: DiT forward"]  # one v_old forward per trained (image, step), like v_θ's
    return model_flops(parts) + extra


def run_one(variant: str, seed: int, steps: int, url: str, shape: DeepGenShape, root: Path) -> Curve:
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(f"a picture of thing number {i}" for i in range(64)) + "\n")
    yaml = root / "train.yaml"
    yaml.write_text(
        "sampling_mode: sample_proportional\n"
        f"datasets:\n  - name: demo\n    path: {prompts}\n    sample_weight: 1.0\n    rewards: {{ocr: 1.0}}\n"
    )
    out = root / f"{variant}-{seed}"
    argv = [*BASE, *VARIANTS[variant], "--seed", str(seed), "--max_steps", str(steps)]
    cfg = parse_args([*argv, "--dataset_config", str(yaml), "--output_dir", str(out), "--ocr_url", url], environ={})
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bars of 12 runs
        train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = flops_per_step(cfg, shape)
    return Curve(
        rewards=[row["reward/total"] for row in rows],
        flops=[per_step * (i + 1) for i in range(len(rows))],
        seconds=list(_cumsum(row["time/step"] for row in rows)),
    )


def steps_to_gain(curve: Curve, gain: float) -> int | None:
    """Index of the first step whose smoothed reward reaches the first step's + `gain`, or None."""
    start = curve.rewards[0]
    for i in range(len(curve.rewards)):
        window = curve.rewards[max(0, i - SMOOTH + 1) : i + 1]
        if i >= SMOOTH - 1 and sum(window) / len(window) >= start + gain:
            return i
    return None


def summarize(curves: dict[str, list[Curve]], gain: float) -> list[str]:
    """The compute-to-reward table, one line per variant, ratios to the first variant (flowgrpo)."""
    rows, medians = [], {}
    for name, runs in curves.items():
        hits = [(i, c) for c in runs if (i := steps_to_gain(c, gain)) is not None]
        final = statistics.median(c.rewards[-1] - c.rewards[0] for c in runs)
        if 2 * len(hits) < len(runs):
            rows.append((name, f"{len(hits)}/{len(runs)}", "-", "-", "-", "-", "-", f"{final:+.4f}"))
            continue
        steps = [i + 1 for i, _ in hits]
        flops = [c.flops[i] for i, c in hits]
        secs = [c.seconds[i] for i, c in hits]
        medians[name] = (statistics.median(flops), statistics.median(secs))
        rows.append(
            (
                name, f"{len(hits)}/{len(runs)}", f"{statistics.median(steps):g}",
                f"{medians[name][0] / 1e9:.2f} [{min(flops) / 1e9:.2f}, {max(flops) / 1e9:.2f}]", "",
                f"{medians[name][1]:.1f} [{min(secs):.1f}, {max(secs):.1f}]", "", f"{final:+.4f}",
            )
        )  # fmt: skip
    base = medians.get(next(iter(curves)))
    lines = [
        f"reward gain +{gain} (smoothed over {SMOOTH} steps) over the first step; median [min, max] over the "
        "seeds that reached it; ratios: median / flowgrpo's median",
        f"{'algorithm':<18} {'reached':>7} {'steps':>5} {'GFLOPs to gain':>22} {'x flowgrpo':>10} "
        f"{'wall s to gain':>20} {'x flowgrpo':>10} {'final gain':>10}",
    ]
    for name, reached, steps, flops, _, secs, _, final in rows:
        ratio_f = ratio_s = "-"
        if base is not None and name in medians:
            ratio_f, ratio_s = f"{medians[name][0] / base[0]:.2f}", f"{medians[name][1] / base[1]:.2f}"
        lines.append(
            f"{name:<18} {reached:>7} {steps:>5} {flops:>22} {ratio_f:>10} {secs:>20} {ratio_s:>10} {final:>10}"
        )
    return lines


def plot(curves: dict[str, list[Curve]], png: Path, gain: float) -> None:
    """Two panels: reward against cumulative model GFLOPs and against wall seconds, a line per seed."""
    width, height, margin = 1200, 480, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    values = [r for runs in curves.values() for c in runs for r in c.rewards]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    low, high = low - pad, high + pad
    panels = (("cumulative model GFLOPs", lambda c: [f / 1e9 for f in c.flops]), ("wall seconds", lambda c: c.seconds))
    for p, (label, xs_of) in enumerate(panels):
        left, right = margin + p * width // 2, (p + 1) * width // 2 - 20
        top, bottom = 40, height - margin
        x_max = max(max(xs_of(c)) for runs in curves.values() for c in runs)
        draw.rectangle((left, top, right, bottom), outline="black")
        for i in range(5):
            value = low + i * (high - low) / 4
            y = bottom - (value - low) / (high - low) * (bottom - top)
            draw.text((left - 50, y - 7), f"{value:.3f}", fill="black", font=font)
            x_value = x_max * i / 4
            draw.text((left + (right - left) * i / 4 - 12, bottom + 6), f"{x_value:.3g}", fill="black", font=font)
        draw.text(((left + right) // 2 - 60, height - 24), label, fill="black", font=font)
        for k, (name, runs) in enumerate(curves.items()):
            colour = COLOURS[k % len(COLOURS)]
            for c in runs:
                pts = [
                    (left + x / x_max * (right - left), bottom - (r - low) / (high - low) * (bottom - top))
                    for x, r in zip(xs_of(c), c.rewards, strict=True)
                ]
                draw.line(pts, fill=colour, width=2)
            if p == 0:
                draw.rectangle((left + 10, top + 10 + 18 * k, left + 22, top + 22 + 18 * k), fill=colour)
                draw.text((left + 28, top + 8 + 18 * k), name, fill="black", font=font)
    draw.text((margin, 12), f"brightness reward, tiny DeepGen on CPU; table: gain +{gain}", fill="black", font=font)
    png.parent.mkdir(parents=True, exist_ok=True)
    image.save(png, format="PNG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seeds", type=int, default=12, help="seeds 0..N-1 per algorithm (3 seeds ranked the rules by noise)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gain", type=float, default=0.01, help="brightness gain over the first step's reward")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"among {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench-learn")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or args.seeds < 1 or args.steps < SMOOTH:
        raise SystemExit(f"--variants among {', '.join(VARIANTS)} (got {unknown}), --seeds >= 1, --steps >= {SMOOTH}")
    logging.basicConfig(level=logging.WARNING)
    shape = tiny_shape(build_tiny())
    curves: dict[str, list[Curve]] = {v: [] for v in variants}
    with reward_service("deepgen_trainer.demo_reward", {"DEMO_REWARD_OBJECTIVE": "bright"}) as url:
        if url is None:
            raise SystemExit("the brightness reward service did not start")
        with tempfile.TemporaryDirectory() as tmp:
            for seed in range(args.seeds):
                for variant in variants:  # interleaved, so a load change on the machine hits every variant alike
                    t0 = time.perf_counter()
                    curve = run_one(variant, seed, args.steps, url, shape, Path(tmp))
                    curves[variant].append(curve)
                    print(
                        f"{variant:<18} seed {seed}: reward {curve.rewards[0]:.4f} -> {curve.rewards[-1]:.4f}, "
                        f"{curve.flops[-1] / 1e9:.2f} GFLOPs, {time.perf_counter() - t0:.0f} s",
                        flush=True,
                    )
    print()
    for line in summarize(curves, args.gain):
        print(line)
    png = args.out / "curves.png"
    plot(curves, png, args.gain)
    (args.out / "curves.json").write_text(
        json.dumps({k: [dataclasses.asdict(c) for c in v] for k, v in curves.items()})
    )
    print(f"curves: {png}")


def _tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _cumsum(values: Iterable[float]) -> list[float]:
    total, out = 0.0, []
    for v in values:
        total += v
        out.append(total)
    return out


if __name__ == "__main__":
    main()
