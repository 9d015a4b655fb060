"""`make bench-gpu`: the trainer's default MR-GRPO step with DeepGen at its real size, random weights.

The model is built in code (benchmarks/real_size.py) from the shapes of benchmarks/flops.py (Qwen2.5-VL-3B
with its vision tower, the SCB connector with 128 think tokens, the SD3.5-Medium 2B MMDiT, the SD3 VAE; a
byte-level BPE tokenizer built here), so nothing is downloaded and the FLOP count matches what runs.
clip_sim scores the images with a CLIP ViT-L/14 of random weights, written as an HF folder and loaded
through the trainer's own path; the remote rewards (OCR, UnifiedReward) are left out, since they run on
their own machines and overlap the rollout.

Each run is the real loop (`deepgen_trainer.train.train` under torchrun) with the seed's defaults: 4
prompts × 8 images per GPU at 512², 50 SDE steps of which 30 are trained, KL reference, SFT-aux batch,
gradient checkpointing, bf16, ZeRO-2 (`--deepspeed zero2`). It runs on one GPU, then on every GPU of
the machine, and reports per world size: images/s/GPU, the median time of each phase after the warm-up
steps (clip_sim apart from the rollout it runs in), memory (max over ranks: peak allocated and peak
reserved by torch's allocator, and the peak the device reports in use, which adds the CUDA context, NCCL's
buffers and any other process on the GPU) and MFU / HFU (model FLOPs of flops.py, with and without the
recompute of checkpointing, over the step time and the accelerator's dense bf16 peak: PEAK_TFLOPS by
device name, else --peak_tflops), and the per-GPU throughput of every GPU against one GPU.

Those rows have no remote reward: their images/s is an upper bound. One more row (on the smallest world
size; --reward_latency 0 leaves it out) adds a remote reward answering every request after a fixed
latency (the demo reward service, as `make bench-train` uses it) with `--one_step_off_policy`, which
scores step t while step t+1 generates. No checkpoint is written (at real size one is ~34 GiB).
The arguments are checked before torchrun starts; a failed run ends with its worker's own error.

`--depth N` keeps the real widths with N layers in every stack (VLM, vision tower, connector, DiT,
CLIP towers): the reduced variant that tests/test_bench_gpu.py runs on CPU with small images.

Usage:
  make bench-gpu                                  # = python benchmarks/bench_gpu.py
  python benchmarks/bench_gpu.py --gpus 1 --steps 3 --peak_tflops 989
  python benchmarks/bench_gpu.py --depth 2 --image_size 64 --num_inference_steps 4 --prompts 2 \\
      --rollout_n 2 --no-bf16 --gpus 1           # the CPU variant (no GPU: torchrun runs on the CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.flops` when run as a script

from benchmarks.bench_train import fixed_latency_service  # noqa: E402
from benchmarks.flops import StepShape, model_flops, step_flops, utilisation  # noqa: E402
from benchmarks.real_size import build_deepgen, model_shape, write_random_clip  # noqa: E402
from deepgen_trainer.config import ConfigError, TrainConfig, parse_args  # noqa: E402
from deepgen_trainer.engine.distributed import close_world, init_world  # noqa: E402
from deepgen_trainer.model.tiny import build_tiny_tokenizer  # noqa: E402
from deepgen_trainer.train import loop, train  # noqa: E402

log = logging.getLogger("bench_gpu")

PROMPTS = REPO / "tests" / "fixtures" / "prompts" / "general.txt"
PHASES = ("rollout", "clip_sim", "reward", "update", "step")
# Dense bf16 peak TFLOP/s (no sparsity) of the common accelerators, by a pattern of the CUDA device name;
# the first match wins (the PCIe and NVL H100s before the SXM one). Others: pass --peak_tflops.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"GH200", 989.0),
    (r"H100", 989.0),  # SXM (HBM3)
    (r"H200", 989.0),
    (r"B200", 2250.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
)


def prompt_tokens(template: str) -> int:
    """The longest templated benchmark prompt in the model's tokens: what a batch is padded to at most, and
    what the FLOP count assumes."""
    tokenizer = build_tiny_tokenizer()
    prompts = [p for p in PROMPTS.read_text(encoding="utf-8").splitlines() if p.strip()]
    return max(len(tokenizer(template.format(prompt=p))["input_ids"]) for p in prompts)


# ------------------------------------------------------------------------------------------- one run


def write_inputs(root: Path, image_size: int, sft_images: int, remote: bool = False) -> tuple[Path, Path]:
    """The train YAML (the fixture prompts, clip_sim, and the remote reward served as `ocr` when `remote`) and
    an SFT-aux YAML over generated images."""
    train_yaml = root / "train.yaml"
    rewards = "{clip_sim: 1.0, ocr: 1.0}" if remote else "{clip_sim: 1.0}"
    train_yaml.write_text(f"datasets:\n  - name: general\n    path: {PROMPTS}\n    rewards: {rewards}\n")
    sft = root / "sft"
    sft.mkdir(exist_ok=True)
    lines = []
    for i in range(sft_images):
        colour = (37 * i % 256, 255 - 29 * i % 256, 90)
        Image.new("RGB", (image_size, image_size), colour).save(sft / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a plain image in colour number {i}"}))
    (sft / "data.jsonl").write_text("\n".join(lines) + "\n")
    sft_yaml = root / "sftaux.yaml"
    sft_yaml.write_text(f"resolution: {image_size}\ndatasets:\n  - path: {sft / 'data.jsonl'}\n")
    return train_yaml, sft_yaml


def trainer_flags(args: argparse.Namespace, root: Path) -> list[str]:
    """The trainer's flags of one benchmark run (inputs under `root`, see `write_inputs`): the seed's
    defaults unless the bench's options say otherwise, no trackers, no checkpoints within the run."""
    steps = args.warmup + args.steps
    return [
        "--model", "hf", "--report_to", "none", "--dataset_config", str(root / "train.yaml"),
        "--sftaux_dataset_config", str(root / "sftaux.yaml"), "--clip_model_name_or_path", str(root / "clip"),
        "--output_dir", str(root / "run"), "--max_steps", str(steps), "--save_steps", str(steps + 1),
        "--eval_freq", "0", "--deepspeed", args.deepspeed, "--prompts_per_rank", str(args.prompts),
        "--rollout_n", str(args.rollout_n), "--rollout_micro_batch_size", str(args.rollout_micro_batch_size),
        "--atrain_micro_batch_size", str(args.atrain_micro_batch_size),
        "--num_inference_steps", str(args.num_inference_steps),
        "--image_height", str(args.image_size), "--image_width", str(args.image_size),
        "--bf16" if args.bf16 else "--no-bf16",
        *(["--ocr_url", args.reward_url, "--one_step_off_policy"] if args.reward_url else []),
    ]  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: build the model on this rank's device, train, write peak memory."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(args.root)
    world = init_world()
    if world.is_main:
        write_inputs(root, args.image_size, args.atrain_micro_batch_size, remote=bool(args.reward_url))
        write_random_clip(root / "clip", args.depth)
    if world.distributed:
        torch.distributed.barrier()
    try:
        cfg = parse_args(trainer_flags(args, root), environ={})
        dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        model = build_deepgen(model_shape(args.depth), args.depth, world.device, dtype)
        if world.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(world.device)
        # No checkpoint: the loop's last step would write one (~34 GiB at real size) before the results.
        loop.checkpoint = lambda run, step: log.info("bench-gpu: checkpoint of step %d not written", step)
        with DeviceMemory(world.device) as device_memory:
            train(cfg, world, model=model)
    except BaseException as exc:  # the parent reports it as the run's reason
        (root / f"error-rank{world.rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        close_world(world)
    if world.device.type == "cuda":
        memory = {
            "allocated": torch.cuda.max_memory_allocated(world.device),
            "reserved": torch.cuda.max_memory_reserved(world.device),
            "device": device_memory.peak,
        }
    else:
        memory = {"allocated": None, "reserved": None, "device": _peak_rss_bytes()}
    (root / f"memory-rank{world.rank}.json").write_text(json.dumps(memory))


class DeviceMemory:
    """The peak memory the GPU reports in use (total − free: the CUDA context, NCCL buffers and other
    processes included), sampled every 0.2 s from a thread while the block runs. None on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> DeviceMemory:
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()

    def _sample(self) -> None:
        while True:
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak = max(self.peak or 0, total - free)
            if self._stop.wait(0.2):
                return


def _peak_rss_bytes() -> int:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


# ------------------------------------------------------------------------------------------- the report


@dataclasses.dataclass
class Result:
    """One world size's numbers; times are medians over the measured steps, in seconds."""

    world_size: int
    variant: str
    images_per_gpu: int
    times: dict[str, float]
    images_per_sec_per_gpu: float
    peak_allocated_gib: float | None
    peak_reserved_gib: float | None
    peak_device_gib: float | None
    memory_kind: str
    mfu: float | None
    hfu: float | None


def run_world(args: argparse.Namespace, world_size: int, parent: Path, reward_url: str = "") -> Result:
    """Launch `world_size` ranks with torchrun and summarise their metrics.jsonl (with the remote reward at
    `reward_url` and --one_step_off_policy when given)."""
    variant = f"+{args.reward_latency:g}s reward, 1-off" if reward_url else "clip_sim only"
    root = parent / f"world{world_size}{'-remote' if reward_url else ''}"
    root.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
        __file__, "--worker", "--root", str(root), *forwarded(args),
        *(["--reward_url", reward_url] if reward_url else []),
    ]  # fmt: skip
    log.info("%s", " ".join(command))
    done = subprocess.run(command, cwd=REPO, timeout=args.timeout_s, check=False)
    if done.returncode != 0:
        reasons = [
            f"rank {r}: {p.read_text()}" for r in range(world_size) if (p := root / f"error-rank{r}.txt").is_file()
        ]
        reason = "; ".join(reasons) or "no worker reported an error (killed? its log is above)"
        raise SystemExit(f"bench-gpu: the {world_size}-rank run ({variant}) exited {done.returncode}: {reason}")
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if r["step"] > args.warmup]
    times = {p: statistics.median(r[f"time/{p}"] for r in measured) for p in PHASES}
    times["other"] = times["step"] - sum(times[p] for p in PHASES if p != "step")
    memory = [json.loads((root / f"memory-rank{r}.json").read_text()) for r in range(world_size)]
    images = args.prompts * args.rollout_n
    mfu = hfu = None
    if args.peak_tflops:
        cfg = parse_args(trainer_flags(args, root), environ={})
        shape = model_shape(args.depth)
        tokens = prompt_tokens(shape.deepgen.prompt_template)
        parts = step_flops(StepShape.from_train_config(cfg, sftaux=True, prompt_tokens=tokens), shape)
        peak = args.peak_tflops * 1e12
        mfu = utilisation(model_flops(parts), times["step"], peak)
        hfu = utilisation(sum(parts.values()), times["step"], peak)

    def peak_gib(kind: str) -> float | None:
        values = [m[kind] for m in memory if m[kind] is not None]
        return max(values) / 2**30 if values else None

    on_gpu = memory[0]["allocated"] is not None
    return Result(
        world_size, variant, images, times, images / times["step"], peak_gib("allocated"), peak_gib("reserved"),
        peak_gib("device"), "GPU" if on_gpu else "host memory (peak RSS, in the device column)", mfu, hfu,
    )  # fmt: skip


def forwarded(args: argparse.Namespace) -> list[str]:
    """The options a worker needs, as flags."""
    flags = [
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--prompts", str(args.prompts),
        "--rollout_n", str(args.rollout_n), "--rollout_micro_batch_size", str(args.rollout_micro_batch_size),
        "--atrain_micro_batch_size", str(args.atrain_micro_batch_size),
        "--num_inference_steps", str(args.num_inference_steps), "--image_size", str(args.image_size),
        "--deepspeed", args.deepspeed, "--bf16" if args.bf16 else "--no-bf16",
    ]  # fmt: skip
    if args.depth is not None:
        flags += ["--depth", str(args.depth)]
    return flags


def report(results: list[Result], args: argparse.Namespace, device: str) -> str:
    base = results[0]
    depth = "real depth" if args.depth is None else f"{args.depth} layer(s) per stack, real widths"

    def gib(value: float | None) -> str:
        return f"{value:8.2f}" if value is not None else f"{'n/a':>8}"

    lines = [
        f"bench-gpu on {device}: DeepGen ({depth}), random weights, {'bf16' if args.bf16 else 'fp32'}, "
        f"--deepspeed {args.deepspeed}; per GPU {args.prompts} prompts x {args.rollout_n} images of "
        f"{args.image_size}x{args.image_size}, {args.num_inference_steps} SDE steps; medians of {args.steps} "
        f"step(s) after {args.warmup} warm-up",
        f"{'GPUs':>4} {'rewards':<22} {'img/s/GPU':>9} {'vs 1':>5} {'step s':>7} {'rollout':>7} {'clip_sim':>8} "
        f"{'reward':>7} {'update':>7} {'other':>6} {'alloc GiB':>9} {'resv GiB':>8} {'dev GiB':>8} "
        f"{'MFU':>6} {'HFU':>6}",
    ]
    for r in results:
        t = r.times
        speed = r.images_per_sec_per_gpu
        util = f"{r.mfu:6.1%} {r.hfu:6.1%}" if r.mfu is not None and r.hfu is not None else f"{'n/a':>6} {'n/a':>6}"
        lines.append(
            f"{r.world_size:>4} {r.variant:<22} {speed:9.3f} {speed / base.images_per_sec_per_gpu:5.2f} "
            f"{t['step']:7.2f} {t['rollout']:7.2f} {t['clip_sim']:8.2f} {t['reward']:7.2f} {t['update']:7.2f} "
            f"{t['other']:6.2f} {gib(r.peak_allocated_gib):>9} {gib(r.peak_reserved_gib)} "
            f"{gib(r.peak_device_gib)} {util}"
        )
    lines += [
        f"memory: {base.memory_kind}, max over ranks (alloc/resv: torch's allocator peaks; dev: what the device "
        "reports in use, with the CUDA context, NCCL buffers and any other process); "
        f"MFU/HFU against {args.peak_tflops or 'no'} TFLOP/s ({args.peak_source})",
        "rows with clip_sim only have no remote reward latency: their img/s is an upper bound for a run with "
        "remote rewards"
        + (
            "; the last row adds one (--reward_latency) with --one_step_off_policy"
            if any(r.variant != base.variant for r in results)
            else "; --reward_latency S adds a row with one"
        ),
    ]
    return "\n".join(lines)


def peak_tflops_for(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by name (PEAK_TFLOPS), None when it is not in the table."""
    for pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def check(args: argparse.Namespace, gpus: int) -> list[int]:
    """Validate the options before any torchrun starts; returns the world sizes. Raises SystemExit naming
    the option and the fix."""
    try:
        sizes = sorted({(gpus or 1) if s.strip() == "all" else int(s) for s in args.gpus.split(",")})
    except ValueError:
        raise SystemExit(f"bench-gpu: --gpus {args.gpus!r}: give world sizes and/or 'all', comma-separated") from None
    available = gpus or 1
    if sizes[0] < 1 or sizes[-1] > available:
        where = f"{gpus} GPU(s)" if gpus else "no GPU (one CPU process)"
        raise SystemExit(f"bench-gpu: --gpus {args.gpus}: this machine has {where}; pass sizes from 1 to {available}")
    for name in ("steps", "prompts", "rollout_n", "timeout_s"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"bench-gpu: --{name} must be > 0, got {getattr(args, name)}")
    if args.warmup < 0 or args.reward_latency < 0:
        raise SystemExit("bench-gpu: --warmup and --reward_latency must be >= 0")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise SystemExit(f"bench-gpu: --peak_tflops must be > 0, got {args.peak_tflops}")
    model_shape(args.depth)  # --depth
    with tempfile.TemporaryDirectory() as root:  # the trainer's own checks of the flags each run passes
        for url in ("", "grpc://127.0.0.1:1" if args.reward_latency else ""):
            try:
                parse_args(
                    trainer_flags(argparse.Namespace(**{**vars(args), "reward_url": url}), Path(root)), environ={}
                )
            except (ConfigError, SystemExit) as exc:
                raise SystemExit(f"bench-gpu: the trainer refuses these options: {exc}") from None
    return sizes


def main(argv: list[str] | None = None) -> list[Result] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,all", help="world sizes to run, comma-separated; 'all' = every GPU")
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the medians")
    parser.add_argument("--steps", type=int, default=2, help="measured steps")
    parser.add_argument("--depth", type=int, default=None, help="layers per stack (reduced variant; default: real)")
    parser.add_argument("--prompts", type=int, default=TrainConfig.prompts_per_rank, help="prompts per GPU")
    parser.add_argument("--rollout_n", type=int, default=TrainConfig.rollout_n)
    parser.add_argument("--rollout_micro_batch_size", type=int, default=TrainConfig.rollout_micro_batch_size)
    parser.add_argument("--atrain_micro_batch_size", type=int, default=TrainConfig.atrain_micro_batch_size)
    parser.add_argument("--num_inference_steps", type=int, default=TrainConfig.num_inference_steps)
    parser.add_argument("--image_size", type=int, default=TrainConfig.image_height)
    parser.add_argument("--deepspeed", default="zero2", help="DeepSpeed config name, or none")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--peak_tflops", type=float, default=None,
        help="accelerator's dense bf16 peak for MFU/HFU (default: by device name from PEAK_TFLOPS; none on CPU)",
    )  # fmt: skip
    parser.add_argument(
        "--reward_latency", type=float, default=3.0,
        help="seconds a remote reward takes per request in the extra --one_step_off_policy row (0: no such row)",
    )  # fmt: skip
    parser.add_argument("--report", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--timeout_s", type=float, default=3600.0, help="limit of each torchrun run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", default="", help=argparse.SUPPRESS)
    parser.add_argument("--reward_url", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0) if gpus else ""
    args.peak_source = "--peak_tflops"
    if args.peak_tflops is None and gpus:
        args.peak_tflops = peak_tflops_for(name)
        args.peak_source = (
            f"table entry for {name}" if args.peak_tflops else f"{name} is not in the table: pass --peak_tflops"
        )
    sizes = check(args, gpus)
    device = f"{gpus}x {name}" if gpus else "CPU (no GPU)"
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as parent:
        results = [run_world(args, n, Path(parent)) for n in sizes]
        if args.reward_latency:
            with fixed_latency_service(args.reward_latency) as url:
                if url is not None:
                    results.append(run_world(args, sizes[0], Path(parent), reward_url=url))
    print(report(results, args, device))
    if args.report is not None:
        payload = {"device": device, "args": {k: v for k, v in vars(args).items() if k != "report"}}
        payload["results"] = [dataclasses.asdict(r) for r in results]
        args.report.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
