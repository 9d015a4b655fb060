"""`make bench-gpu`: the trainer's default MR-GRPO step with DeepGen at its real size, random weights.

The model is built in code from the shapes of benchmarks/flops.py (Qwen2.5-VL-3B with its vision tower,
the SCB connector with 128 think tokens, the SD3.5-Medium 2B MMDiT, the SD3 VAE; a byte-level BPE
tokenizer built here), so nothing is downloaded and the FLOP count matches what runs. clip_sim scores
the images with a CLIP ViT-L/14 of random weights, written as an HF folder and loaded through the
trainer's own path; the remote rewards (OCR, UnifiedReward) are left out, since they run on their own
machines and overlap the rollout.

Each run is the real loop (`deepgen_trainer.train.train` under torchrun) with the seed's defaults: 4
prompts × 8 images per GPU at 512², 50 SDE steps of which 30 are trained, KL reference, SFT-aux batch,
gradient checkpointing, bf16, ZeRO-2 (`--deepspeed zero2`). It runs on one GPU, then on every GPU of
the machine, and reports per world size: images/s/GPU, the median time of each phase after the warm-up
steps, peak GPU memory (max over ranks) and MFU / HFU (model FLOPs of flops.py, with and without the
recompute of checkpointing, over the step time and the accelerator's peak), and the per-GPU throughput
of every GPU against one GPU.

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
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.flops` when run as a script

from benchmarks.flops import (  # noqa: E402
    H100_BF16_DENSE_TFLOPS,
    DeepGenShape,
    StepShape,
    _mrope_section,
    model_flops,
    step_flops,
    utilisation,
)
from deepgen_trainer.config import TrainConfig, parse_args  # noqa: E402
from deepgen_trainer.engine.distributed import close_world, init_world  # noqa: E402
from deepgen_trainer.model.deepgen import DeepGen  # noqa: E402
from deepgen_trainer.model.tiny import QWEN_SPECIAL_TOKENS, build_tiny_tokenizer  # noqa: E402
from deepgen_trainer.rewards.clip_sim import ClipSimReward, build_tiny_clip  # noqa: E402
from deepgen_trainer.train import train  # noqa: E402

log = logging.getLogger("bench_gpu")

PROMPTS = REPO / "tests" / "fixtures" / "prompts" / "general.txt"
PHASES = ("rollout", "reward", "update", "step")
# Qwen2.5-VL-3B's vision tower (its output width is the text model's) and CLIP ViT-L/14.
VISION_DEPTH, VISION_FULL_ATTENTION = 32, (7, 15, 23, 31)
CLIP_TEXT_LAYERS, CLIP_VISION_LAYERS = 12, 24


# ------------------------------------------------------------------------------------------- the model


def model_shape(depth: int | None = None) -> DeepGenShape:
    """DeepGen 1.0's shapes (flops.py defaults), or the real widths with `depth` (>= 2) layers in every stack."""
    shape = DeepGenShape()
    if depth is None:
        return shape
    if depth < 2:
        raise SystemExit(f"--depth {depth}: the connector fuses VLM layers below the last one; pass --depth 2 or more")
    dit = dataclasses.replace(
        shape.dit,
        num_layers=depth,
        dual_attention_layers=tuple(i for i in shape.dit.dual_attention_layers if i < depth),
    )
    vlm = dataclasses.replace(shape.vlm, num_hidden_layers=depth)
    connector = dataclasses.replace(shape.deepgen.connector, num_hidden_layers=depth)
    deepgen = dataclasses.replace(
        # SCB fuses hidden states from the second-to-last layer down: at most depth - 1 of them.
        shape.deepgen,
        fused_layers=min(shape.deepgen.fused_layers, depth - 1),
        layer_stride=1,
        connector=connector,
    )
    return dataclasses.replace(shape, dit=dit, vlm=vlm, deepgen=deepgen)


@contextlib.contextmanager
def building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules created inside get their parameters on `device` in `dtype` (random init there: no 20 GB
    float32 detour through host memory for the full model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def build_deepgen(shape: DeepGenShape, depth: int | None, device: torch.device, dtype: torch.dtype) -> DeepGen:
    """DeepGen of `shape` with random weights, built on `device` in `dtype` (as `load_deepgen` loads it)."""
    tokenizer = build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vlm = shape.vlm
    vision_depth = VISION_DEPTH if depth is None else depth
    lmm_config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": vlm.hidden_size,
            "intermediate_size": vlm.intermediate_size,
            "num_hidden_layers": vlm.num_hidden_layers,
            "num_attention_heads": vlm.num_attention_heads,
            "num_key_value_heads": vlm.num_key_value_heads,
            "max_position_embeddings": 32768,
            "max_window_layers": vlm.num_hidden_layers,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(vlm)},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": vlm.hidden_size,
            "fullatt_block_indexes": [i for i in VISION_FULL_ATTENTION if i < vision_depth],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    lmm_config._attn_implementation = "sdpa"
    vae = shape.vae
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # float32 grid, CPU
    with building_on(device, dtype):
        lmm = Qwen2_5_VLForConditionalGeneration(lmm_config).eval()
        transformer = SD3Transformer2DModel(**shape.dit.kwargs())
        autoencoder = AutoencoderKL(**vae.kwargs(), scaling_factor=1.5305, shift_factor=0.0609).eval()
        return DeepGen(
            lmm,
            transformer,
            autoencoder,
            scheduler,
            tokenizer,
            shape.deepgen,
        )


def write_random_clip(path: Path, depth: int | None) -> Path:
    """A CLIP ViT-L/14 with random weights (`depth` layers per tower if given) as the HF folder
    `CLIP_MODEL_NAME_OR_PATH` points at; the tokenizer is the tiny CLIP's, built in code."""
    tokenizer = build_tiny_clip().tokenizer
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": CLIP_TEXT_LAYERS if depth is None else depth,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": CLIP_VISION_LAYERS if depth is None else depth,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
        },
        projection_dim=768,
    )
    ClipSimReward(CLIPModel(config), tokenizer, CLIPImageProcessorPil()).save_pretrained(path)
    return path


def prompt_tokens(template: str) -> int:
    """The longest templated benchmark prompt in the model's tokens: what a batch is padded to at most, and
    what the FLOP count assumes."""
    tokenizer = build_tiny_tokenizer()
    prompts = [p for p in PROMPTS.read_text(encoding="utf-8").splitlines() if p.strip()]
    return max(len(tokenizer(template.format(prompt=p))["input_ids"]) for p in prompts)


# ------------------------------------------------------------------------------------------- one run


def write_inputs(root: Path, image_size: int, sft_images: int) -> tuple[Path, Path]:
    """The train YAML (the fixture prompts, clip_sim) and an SFT-aux YAML over generated images."""
    train_yaml = root / "train.yaml"
    train_yaml.write_text(f"datasets:\n  - name: general\n    path: {PROMPTS}\n    rewards: {{clip_sim: 1.0}}\n")
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
    ]  # fmt: skip


def worker(args: argparse.Namespace) -> None:
    """One rank under torchrun: build the model on this rank's device, train, write peak memory."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(args.root)
    world = init_world()
    if world.is_main:
        write_inputs(root, args.image_size, args.atrain_micro_batch_size)
        write_random_clip(root / "clip", args.depth)
    if world.distributed:
        torch.distributed.barrier()
    cfg = parse_args(trainer_flags(args, root), environ={})
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = build_deepgen(model_shape(args.depth), args.depth, world.device, dtype)
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
    try:
        train(cfg, world, model=model)
    finally:
        close_world(world)
    if world.device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(world.device), "GPU memory allocated (torch)"
    else:
        peak, kind = _peak_rss_bytes(), "host memory (peak RSS)"
    (root / f"memory-rank{world.rank}.json").write_text(json.dumps({"peak_bytes": peak, "kind": kind}))


def _peak_rss_bytes() -> int:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


# ------------------------------------------------------------------------------------------- the report


@dataclasses.dataclass
class Result:
    """One world size's numbers; times are medians over the measured steps, in seconds."""

    world_size: int
    images_per_gpu: int
    times: dict[str, float]
    images_per_sec_per_gpu: float
    peak_memory_gib: float
    memory_kind: str
    mfu: float | None
    hfu: float | None


def run_world(args: argparse.Namespace, world_size: int, parent: Path) -> Result:
    """Launch `world_size` ranks with torchrun and summarise their metrics.jsonl."""
    root = parent / f"world{world_size}"
    root.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
        __file__, "--worker", "--root", str(root), *forwarded(args),
    ]  # fmt: skip
    log.info("%s", " ".join(command))
    done = subprocess.run(command, cwd=REPO, timeout=args.timeout_s, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench-gpu: the {world_size}-rank run exited {done.returncode} (its log is above)")
    for checkpoint in (root / "run").glob("checkpoint-*"):  # the run's final one: tens of GB at real size
        shutil.rmtree(checkpoint)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if r["step"] > args.warmup]
    times = {p: statistics.median(r[f"time/{p}"] for r in measured) for p in PHASES}
    times["other"] = times["step"] - times["rollout"] - times["reward"] - times["update"]
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
    return Result(
        world_size, images, times, images / times["step"], max(m["peak_bytes"] for m in memory) / 2**30,
        memory[0]["kind"], mfu, hfu,
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
    lines = [
        f"bench-gpu on {device}: DeepGen ({depth}), random weights, {'bf16' if args.bf16 else 'fp32'}, "
        f"--deepspeed {args.deepspeed}; per GPU {args.prompts} prompts x {args.rollout_n} images of "
        f"{args.image_size}x{args.image_size}, {args.num_inference_steps} SDE steps; medians of {args.steps} "
        f"step(s) after {args.warmup} warm-up",
        f"{'GPUs':>5} {'img/s/GPU':>10} {'vs 1':>6} {'step s':>8} {'rollout':>8} {'reward':>8} {'update':>8} "
        f"{'other':>8} {'peak GiB':>9} {'MFU':>7} {'HFU':>7}",
    ]
    for r in results:
        t = r.times
        speed = r.images_per_sec_per_gpu
        util = f"{r.mfu:7.1%} {r.hfu:7.1%}" if r.mfu is not None and r.hfu is not None else f"{'n/a':>7} {'n/a':>7}"
        lines.append(
            f"{r.world_size:>5} {speed:10.3f} {speed / base.images_per_sec_per_gpu:6.2f} {t['step']:8.2f} "
            f"{t['rollout']:8.2f} {t['reward']:8.2f} {t['update']:8.2f} {t['other']:8.2f} "
            f"{r.peak_memory_gib:9.2f} {util}"
        )
    lines.append(f"peak memory: {base.memory_kind}, max over ranks; MFU/HFU against {args.peak_tflops or 'no'} TFLOP/s")
    return "\n".join(lines)


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
        help=f"accelerator peak for MFU/HFU (default on an H100: {H100_BF16_DENSE_TFLOPS:g}; none on CPU)",
    )  # fmt: skip
    parser.add_argument("--report", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--timeout_s", type=float, default=3600.0, help="limit of each torchrun run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gpus = torch.cuda.device_count()
    if args.peak_tflops is None and gpus and "H100" in torch.cuda.get_device_name(0):
        args.peak_tflops = H100_BF16_DENSE_TFLOPS
    device = f"{gpus}x {torch.cuda.get_device_name(0)}" if gpus else "CPU (no GPU)"
    sizes = sorted({(gpus or 1) if s.strip() == "all" else int(s) for s in args.gpus.split(",")})
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as parent:
        results = [run_world(args, n, Path(parent)) for n in sizes]
    print(report(results, args, device))
    if args.report is not None:
        payload = {"device": device, "args": {k: v for k, v in vars(args).items() if k != "report"}}
        payload["results"] = [dataclasses.asdict(r) for r in results]
        args.report.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
