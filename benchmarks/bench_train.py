"""Training step benchmark on CPU with the tiny DeepGen: where a step's time goes, what a remote
reward adds, the rollout sampler's overhead over plain Euler sampling, and peak memory.

1. Rollout sampler overhead: `sde_rollout` with each SDE sampler (storing every latent and log-prob)
   against `ode_sample` (plain Euler, `ode_step`) with the same model, batch and 50 steps, in
   interleaved rounds: best round and median paired ratio to Euler (DESIGN §7 target: ≤ 5%
   overhead). The tiny DiT's forward is noisy next to the sampler's few microseconds, so the step
   functions are also timed alone on the same latents and their extra time over `ode_step` is shown
   as a share of an Euler rollout step.
2. The real loop (`deepgen_trainer.train.train`, in process) with the default step shape (4 prompts
   × 8 images, 50 SDE steps, 30 trained, KL reference, SFT-aux batch, gradient checkpointing) on
   64×64 images: the baseline with the in-process clip_sim reward only; then every image also scored
   by a reward service of fixed latency L per request (`deepgen_trainer.rewards.demo` with
   DEMO_REWARD_LATENCY_S, L = 1.2 × the baseline's step unless --latency), synchronous and with
   --one_step_off_policy; then the real reward-ocr service (`python -m reward_ocr`, one OCR worker
   process per core, over gRPC) scoring the OCR prompts as well, synchronous and one-step-off.
   Medians of the per-step `time/*` metrics after a warm-up step, with ratios to the baseline's
   step time; DESIGN §7 asks for reward waiting ≤ 10% of the step.
3. Peak resident memory (VmHWM, reset before each phase through /proc/self/clear_refs) of each
   phase. tracemalloc does not see tensor storage and torch keeps no allocator statistics on CPU,
   so RSS is the meaningful number here.

The tiny DiT is small next to the per-step Python and sampler work, so the sampler overhead here is
an upper bound of the GPU one, where a step is a 2 TFLOP DiT forward per image (benchmarks/flops.py).

Usage: `make bench-train` (or `python benchmarks/bench_train.py --steps 5 --rounds 5 --no-ocr --no-latency`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image

from deepgen_common.client import wait_ready
from deepgen_trainer.algorithms.rollout import ode_sample, sde_rollout
from deepgen_trainer.algorithms.sde import SAMPLERS, ode_step, sde_step_with_logprob
from deepgen_trainer.config import parse_args
from deepgen_trainer.model.deepgen import DeepGen
from deepgen_trainer.model.tiny import TINY_IMAGE_SIZE, build_tiny
from deepgen_trainer.train import train

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "tests" / "fixtures" / "prompts"  # the test suite's prompt lists: no data outside the repository
PHASES = ("rollout", "reward", "update", "step")
BASELINE = "euler ode_sample (baseline)"


# ------------------------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """Peak resident memory since the last reset (VmHWM; getrusage's ru_maxrss when unavailable)."""
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    if match is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return int(match.group(1)) / 1024


# ------------------------------------------------------------------------------------------- training


def write_inputs(root: Path, with_ocr: bool, remote_everywhere: bool = False) -> tuple[Path, Path]:
    """A train YAML (UniGenBench general prompts with clip_sim; with OCR, the OCR prompts with clip_sim +
    ocr as a second dataset; with ``remote_everywhere``, the general prompts with clip_sim + the remote
    reward, so that every image goes to the service) and an SFT-aux YAML over a few generated images."""
    rewards = "{clip_sim: 1.0, ocr: 1.0}" if remote_everywhere else "{clip_sim: 1.0}"
    datasets = (
        f"  - name: general\n    path: {PROMPTS / 'general.txt'}\n    sample_weight: 1.0\n    rewards: {rewards}\n"
    )
    if with_ocr and not remote_everywhere:
        datasets += (
            f"  - name: ocr\n    path: {PROMPTS / 'ocr.txt'}\n"
            "    sample_weight: 1.0\n    rewards: {clip_sim: 1.0, ocr: 1.0}\n"
        )
    train_yaml = root / ("train_remote.yaml" if remote_everywhere else "train_ocr.yaml" if with_ocr else "train.yaml")
    train_yaml.write_text(f"sampling_mode: weight_only\ndatasets:\n{datasets}")
    sft = root / "sft"
    if not sft.exists():
        sft.mkdir()
        lines = []
        for i in range(8):
            Image.new("RGB", (80, 64), (30 * i, 255 - 30 * i, 90)).save(sft / f"{i}.png")
            lines.append(json.dumps({"image": f"{i}.png", "caption": f"a plain image in colour number {i}"}))
        (sft / "data.jsonl").write_text("\n".join(lines) + "\n")
    sft_yaml = root / "sftaux.yaml"
    sft_yaml.write_text(f"resolution: {TINY_IMAGE_SIZE}\ndatasets:\n  - path: {sft / 'data.jsonl'}\n")
    return train_yaml, sft_yaml


@dataclass
class TrainRun:
    times: dict[str, list[float]]  # per phase, the steps after the warm-up step
    peak_rss_mib: float
    wall_s: float  # the whole run: setup, warm-up step, measured steps


def run_training(
    root: Path, name: str, steps: int, ocr_url: str | None, extra: Sequence[str] = (), remote_everywhere: bool = False
) -> TrainRun:
    """Train `steps` + 1 steps with the default step shape (plus `extra` flags) and read its metrics;
    `ocr_url` is the remote reward's service (reward-ocr, or the fixed-latency reward)."""
    train_yaml, sft_yaml = write_inputs(root, with_ocr=ocr_url is not None, remote_everywhere=remote_everywhere)
    out = root / name
    argv = [
        "--model", "tiny", "--deepspeed", "none", "--report_to", "none", "--no-bf16",
        "--image_height", str(TINY_IMAGE_SIZE), "--image_width", str(TINY_IMAGE_SIZE),
        "--dataset_config", str(train_yaml), "--sftaux_dataset_config", str(sft_yaml),
        "--output_dir", str(out), "--max_steps", str(steps + 1), "--save_steps", "100000", "--eval_freq", "0",
    ]  # fmt: skip
    if ocr_url is not None:
        argv += ["--ocr_url", ocr_url]
    cfg = parse_args([*argv, *extra], environ={})
    reset_peak_rss()
    start = time.perf_counter()
    # The loop's progress bar and the libraries' warnings go to stderr; keep the report readable.
    with contextlib.redirect_stderr(io.StringIO()):
        train(cfg)
    wall, peak = time.perf_counter() - start, peak_rss_mib()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    times = {phase: [row[f"time/{phase}"] for row in rows] for phase in PHASES}
    if ocr_url is not None:
        failed = [row["reward/ocr/fail_rate"] for row in rows if row.get("reward/ocr/fail_rate") is not None]
        if any(rate > 0 for rate in failed):
            print(f"warning: OCR requests failed in {name} (fail rates {failed})")
    return TrainRun(times, peak, wall)


@contextlib.contextmanager
def reward_service(module: str, env: dict[str, str] | None = None) -> Iterator[str | None]:
    """A reward service as deployed (`python -m <module>`) on free ports; yields its gRPC URL, or None
    (with the reason printed) when it does not start."""
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    env = {**os.environ, **(env or {}), "HOST": "127.0.0.1", "HTTP_PORT": str(ports[0]), "GRPC_PORT": str(ports[1])}
    proc = subprocess.Popen([sys.executable, "-m", module], env={**env, "LOG_LEVEL": "WARNING"})
    try:
        try:
            wait_ready(f"http://127.0.0.1:{ports[0]}", timeout_s=60.0, alive=lambda: proc.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            print(f"{module} service not started ({exc}); skipping its runs")
            yield None
        else:
            yield f"grpc://127.0.0.1:{ports[1]}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def ocr_service() -> contextlib.AbstractContextManager[str | None]:
    """The real reward-ocr service (one OCR worker process per core)."""
    return reward_service("reward_ocr")


def fixed_latency_service(latency_s: float) -> contextlib.AbstractContextManager[str | None]:
    """The demo reward (`deepgen_trainer.rewards.demo`) answering every request after `latency_s`."""
    return reward_service("deepgen_trainer.demo_reward", {"DEMO_REWARD_LATENCY_S": f"{latency_s:.3f}"})


def print_training(results: dict[str, TrainRun]) -> None:
    base_step = statistics.median(next(iter(results.values())).times["step"])
    print(f"{'run':<36} {'rollout s':>9} {'reward s':>9} {'update s':>9} {'step s':>7} {'vs base':>8} "
          f"{'reward/step':>12} {'img/s':>6} {'peak RSS MiB':>13} {'run s':>6}")  # fmt: skip
    for name, run in results.items():
        med = {phase: statistics.median(run.times[phase]) for phase in PHASES}
        print(
            f"{name:<36} {med['rollout']:9.3f} {med['reward']:9.3f} {med['update']:9.3f} {med['step']:7.3f} "
            f"{med['step'] / base_step:7.2f}x {med['reward'] / med['step']:11.1%} {32 / med['step']:6.1f} "
            f"{run.peak_rss_mib:13.0f} {run.wall_s:6.0f}"
        )


# ------------------------------------------------------------------------------------------- sampler overhead


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, calls: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, one sample per round; each round starts at another variant so
    that no variant always runs first (or right after the same neighbour)."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for fn in variants.values():  # warm-up
        fn()
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def sampler_overhead(model: DeepGen, rounds: int, steps: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(seconds per 32-image rollout of `steps` steps, seconds per sampler step alone), per variant."""
    prompts = [line for line in (PROMPTS / "general.txt").read_text().splitlines() if line][:4]
    with torch.no_grad():
        cond = model.encode_prompts(prompts).repeat_interleave(8)
    noise = torch.randn((4, *model.latent_shape(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)), generator=torch.Generator())
    noise = noise.repeat_interleave(8, dim=0)
    sigmas = model.sigmas(steps)
    g = torch.Generator().manual_seed(0)

    def rollout(sampler: str, exact: bool = False) -> Callable[[], object]:
        return lambda: sde_rollout(model, noise, cond, sigmas, sampler, 1.0, generator=g, exact_logprob=exact)

    rollouts = interleaved(
        {
            BASELINE: lambda: ode_sample(model, noise, cond, sigmas, 0.0, None),
            **{f"{s} sde_rollout": rollout(s) for s in SAMPLERS},
            "cps_sde exact log-prob": rollout("cps_sde", exact=True),
        },
        rounds,
    )
    # The same comparison without the DiT: one step function on the same latents (a mid-grid step).
    v, s, s_next = torch.randn_like(noise), sigmas[steps // 2].item(), sigmas[steps // 2 + 1].item()

    def step(sampler: str, exact: bool = False) -> Callable[[], object]:
        return lambda: sde_step_with_logprob(sampler, v, noise, s, s_next, 1.0, generator=g, exact_logprob=exact)

    step_fns = interleaved(
        {
            BASELINE: lambda: ode_step(v, noise, s, s_next),
            **{f"{name} sde_rollout": step(name) for name in SAMPLERS},
            "cps_sde exact log-prob": step("cps_sde", exact=True),
        },
        rounds,
        calls=200,
    )
    return rollouts, step_fns


def print_sampler(rollouts: dict[str, list[float]], step_fns: dict[str, list[float]], steps: int) -> None:
    """Per variant: the best round (background load only ever adds time), the median over rounds of the
    ratio to the Euler rollout of the same round (pairing cancels load that drifts between rounds), and
    the step function alone: its extra time over `ode_step` as a share of an Euler rollout step."""
    base = rollouts[BASELINE]
    euler_step = min(base) / steps
    print(
        f"{'variant':<30} {'best s':>7} {'vs euler':>9} {'median s':>9} {'paired':>8} {'step fn us':>11} "
        f"{'step fn overhead':>17}"
    )
    for name, samples in rollouts.items():
        paired = statistics.median(t / b for t, b in zip(samples, base, strict=True))
        fn_s = min(step_fns[name])
        extra = (fn_s - min(step_fns[BASELINE])) / euler_step
        print(
            f"{name:<30} {min(samples):7.3f} {min(samples) / min(base):8.3f}x {statistics.median(samples):9.3f} "
            f"{paired:7.3f}x {fn_s * 1e6:11.1f} {extra:16.1%}"
        )


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="measured training steps per run (after 1 warm-up)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the sampler comparison")
    parser.add_argument("--sampler_steps", type=int, default=50, help="SDE steps per rollout in the comparison")
    parser.add_argument("--no-ocr", dest="ocr", action="store_false", help="skip the runs with the reward-ocr service")
    parser.add_argument(
        "--no-latency", dest="latency_service", action="store_false", help="skip the runs with the fixed-latency reward"
    )
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds per request of the fixed-latency reward (0: 1.2 x a step)"
    )
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    reset_peak_rss()
    model = build_tiny()
    idle_rss = peak_rss_mib()
    print(
        f"tiny DeepGen on CPU, {torch.get_num_threads()} torch threads; default step shape on "
        f"{TINY_IMAGE_SIZE}x{TINY_IMAGE_SIZE} images: 4 prompts x 8 images, 50 SDE steps, 30 trained, KL reference, "
        f"SFT-aux batch 32, gradient checkpointing; medians of {args.steps} steps after a warm-up step\n"
    )

    print(f"1. rollout sampler overhead: 32 images x {args.sampler_steps} steps, {args.rounds} interleaved rounds")
    reset_peak_rss()
    rollouts, step_fns = sampler_overhead(model, args.rounds, args.sampler_steps)
    sampler_rss = peak_rss_mib()
    print_sampler(rollouts, step_fns, args.sampler_steps)
    print("   DESIGN §7: SDE sampling (with log-probs and stored latents) <= 5% over plain Euler\n")

    results: dict[str, TrainRun] = {}
    off = ["--one_step_off_policy"]
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp)
        results["clip_sim in process (baseline)"] = base = run_training(root, "base", args.steps, None)
        # A reward service of fixed latency L per request, L >= a step's compute (one request per step:
        # the rank's 32 images are one generation micro-batch).
        latency = args.latency if args.latency > 0 else 1.2 * statistics.median(base.times["step"])
        if args.latency_service:
            with fixed_latency_service(latency) as url:
                if url is not None:
                    for label, extra in (("synchronous", []), ("--one_step_off_policy", off)):
                        results[f"+ fixed latency {latency:.2f} s, {label}"] = run_training(
                            root, f"latency{len(extra)}", args.steps, url, extra, remote_everywhere=True
                        )
        if args.ocr:
            with ocr_service() as url:
                if url is not None:
                    results["+ reward-ocr over gRPC"] = run_training(root, "ocr", args.steps, url)
                    results["+ reward-ocr over gRPC, --one_step_off_policy"] = run_training(
                        root, "ocr_off", args.steps, url, off
                    )
    print(
        "2. training step: median time/* metrics of the loop (clip_sim runs in process, inside rollout; reward = "
        "time blocked waiting for remote scores). The default --rollout_micro_batch_size 32 makes the 32 images "
        "of a rank one generation pass: nothing is left to overlap the scoring with in the synchronous step. With "
        "--one_step_off_policy the next step's rollout is generated while this step's images are scored (rollout = "
        "that generation), so a step takes about max(compute, L) instead of compute + L. (On this CPU the OCR "
        "workers and the trainer share the cores, so reward-ocr also slows the compute it overlaps.)"
    )
    print_training(results)
    print("   DESIGN §7: reward wait <= 10% of the step when the services keep up (<= 5% one-step-off)\n")

    print("3. peak resident memory of this process (VmHWM per phase; OCR workers are other processes)")
    print(f"   tiny model built: {idle_rss:.0f} MiB, sampler comparison: {sampler_rss:.0f} MiB, training: see above")


if __name__ == "__main__":
    main()
