"""RL checkpoint → ``.pth`` flat state dict with the SFT DeepGen model's key names.

The SFT DeepGen model (an xtuner model with submodules ``lmm``, ``meta_queries``, ``projector_1``,
``connector``, ``projector_2``, ``projector_3``, ``transformer``, ``vae``) is loaded with xtuner's
``guess_load_checkpoint`` and ``load_state_dict(strict=False)``, so a key family missing from the file
silently stays at its initial value (``projector_2/3`` start at zero: no conditioning at all). The
original's converter therefore writes every family its RL checkpoint holds: ``transformer``,
``connector``, ``projector_1/2/3`` and ``meta_queries``. So does this one by default: the RL-trained
DiT (diffusers names under ``transformer.``; its EMA with ``--ema``) and the DeepGen-only weights the
run used, which every checkpoint keeps (``deepgen_only.safetensors``).

    python -m deepgen_trainer.convert outputs/run1                      # latest complete checkpoint
    python -m deepgen_trainer.convert outputs/run1 --ema --dtype bf16   # the DiT's EMA
    python -m deepgen_trainer.convert outputs/run1/checkpoint-500 --merge-onto sft_iter_N.pth/
    python -m deepgen_trainer.convert outputs/run1 --dit-only           # transformer.* alone

``--merge-onto`` writes those families over a full SFT checkpoint in any format `checkpoint_formats`
reads (flat ``.pth`` / ``.safetensors``, DeepSpeed folders, mmengine Runner files), so the result is
self-contained (VLM and its LoRA, VAE). Inputs are read without running pickled code.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from deepgen_trainer.checkpoints.formats import CheckpointReadError, is_refusal, read_checkpoint
from deepgen_trainer.checkpoints.run_checkpoint import (
    DEEPGEN_ONLY_FILE,
    DIT_PREFIX,
    CheckpointError,
    resolve_checkpoint,
    sft_state_dict,
)

logger = logging.getLogger(__name__)

# The key families the original's converter writes (its RL checkpoint's model.safetensors).
FAMILIES = ("transformer", "connector", "projector_1", "projector_2", "projector_3", "meta_queries")
DtypeName = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MergeMismatch(ValueError):
    """The RL weights do not fit the SFT checkpoint's (different shapes: another architecture)."""


@dataclass(frozen=True)
class MergeReport:
    """What `merge_onto` did: entries replaced, added (absent from the SFT checkpoint), SFT entries of
    the written families the RL checkpoint lacks (`untouched`, kept from SFT), and the SFT entries of
    other families (`kept`: the VLM and its LoRA, the VAE)."""

    replaced: int
    added: int
    untouched: int
    kept: int


def family_of(key: str) -> str:
    """The top-level module of an SFT key (``transformer``, ``connector``, ``lmm``, ...)."""
    return key.split(".", 1)[0]


def family_counts(state: Mapping[str, Tensor]) -> dict[str, int]:
    """Tensors per key family, in the order of `FAMILIES`, then the others alphabetically."""
    counts = Counter(family_of(k) for k in state)
    order = [f for f in FAMILIES if f in counts] + sorted(set(counts) - set(FAMILIES))
    return {f: counts[f] for f in order}


def merge_onto(
    base: Mapping[str, Tensor], rl: Mapping[str, Tensor], source: str = "the SFT checkpoint"
) -> tuple[dict[str, Tensor], MergeReport]:
    """`base` (an SFT state dict) with every entry of `rl` (SFT key names) written over it.

    Raises MergeMismatch listing the keys whose shapes differ. `source` names `base` in errors.
    """
    mismatched = [
        f"{k}: RL {tuple(t.shape)} vs SFT {tuple(base[k].shape)}"
        for k, t in rl.items()
        if k in base and base[k].shape != t.shape
    ]
    if mismatched:
        shown = "\n  ".join(mismatched[:10])
        more = f"\n  ... and {len(mismatched) - 10} more" if len(mismatched) > 10 else ""
        raise MergeMismatch(
            f"{len(mismatched)} tensors differ in shape from {source} (is it the same model?):\n  {shown}{more}"
        )
    written = {family_of(k) for k in rl}
    base_written = {k for k in base if family_of(k) in written}
    merged = dict(base)
    merged.update(rl)
    report = MergeReport(
        replaced=len(base_written & rl.keys()),
        added=len(rl.keys() - base.keys()),
        untouched=len(base_written - rl.keys()),
        kept=len(base) - len(base_written),
    )
    if not any(k.startswith(DIT_PREFIX) for k in base):
        logger.warning("%s has no '%s*' entries: all DiT tensors are added", source, DIT_PREFIX)
    elif report.untouched:
        logger.warning(
            "%d SFT tensors of the written families are not in the RL checkpoint; kept from SFT", report.untouched
        )
    return merged, report


def read_sft_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A full SFT checkpoint in any format `checkpoint_formats` reads, DeepSpeed's ``module.`` wrapper
    removed (the keys otherwise as written: the original's users load them as they are)."""
    tensors = read_checkpoint(path).tensors
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def cast_floating(state: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating-point tensors cast to `dtype`; integer/bool buffers untouched."""
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in state.items()}


def save_state_dict_atomic(state: Mapping[str, Tensor], output: str | Path) -> None:
    """``torch.save`` to a temporary file next to `output`, fsync, then rename onto `output`."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(output.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ConvertResult:
    checkpoint: Path
    output: Path
    families: dict[str, int]
    report: MergeReport | None

    @property
    def tensors(self) -> int:
        return sum(self.families.values())


def convert(
    checkpoint: str | Path,
    output: str | Path | None = None,
    *,
    merge_onto_path: str | Path | None = None,
    dtype: DtypeName | None = None,
    dit_only: bool = False,
    ema: bool = False,
) -> ConvertResult:
    """Write the SFT-named state dict of `checkpoint` (a checkpoint dir, or an output dir → its latest).

    By default every family of `FAMILIES`; `dit_only` writes ``transformer.*`` alone; `ema` writes the
    DiT's EMA instead of its weights. `output` defaults to ``<checkpoint dir>[.ema][.dit][.merged].pth``
    next to the checkpoint directory. `dtype` casts every floating-point tensor of the result; None
    keeps dtypes.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; valid: {sorted(DTYPES)} or None to keep")
    ckpt = resolve_checkpoint(checkpoint)
    if output is None:
        suffix = (".ema" if ema else "") + (".dit" if dit_only else "") + (".merged" if merge_onto_path else "")
        output = ckpt.with_name(f"{ckpt.name}{suffix}.pth")
    logger.info("converting %s%s", ckpt, " (EMA of the DiT)" if ema else "")
    state = sft_state_dict(ckpt, use_ema=ema)
    if dit_only:
        state = {k: v for k, v in state.items() if k.startswith(DIT_PREFIX)}
    elif merge_onto_path is None:
        absent = [f for f in FAMILIES if f not in {family_of(k) for k in state}]
        if absent:
            raise CheckpointError(
                f"{ckpt} lacks the key families {absent} (no {DEEPGEN_ONLY_FILE}: written by an older trainer); "
                "the original's users would load them at their initial value. Pass --merge-onto with the SFT "
                "checkpoint the run started from (its families are kept), or --dit-only for transformer.* alone"
            )
    report = None
    if merge_onto_path is not None:
        logger.info("merging onto %s", merge_onto_path)
        base = read_sft_checkpoint(merge_onto_path)
        state, report = merge_onto(base, state, source=str(merge_onto_path))
    if dtype is not None:
        state = cast_floating(state, DTYPES[dtype])
    save_state_dict_atomic(state, output)
    return ConvertResult(checkpoint=ckpt, output=Path(output), families=family_counts(state), report=report)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepgen_trainer.convert",
        description="RL checkpoint -> .pth state dict with SFT DeepGen key names (load_state_dict(strict=False)).",
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoint-<step> dir, or an output dir (its latest)")
    parser.add_argument("--output", type=Path, default=None, help="default: <checkpoint dir>[.ema][.dit][.merged].pth")
    parser.add_argument(
        "--merge-onto", type=Path, default=None, help="full SFT checkpoint to merge onto (.pth, .safetensors, "
        "DeepSpeed or mmengine folder)"
    )  # fmt: skip
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default keep)")
    parser.add_argument("--dit-only", action="store_true", help="write transformer.* only")
    parser.add_argument("--ema", action="store_true", help="write the DiT's EMA (runs with --ema_decay)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = convert(
            args.checkpoint, args.output, merge_onto_path=args.merge_onto, dtype=args.dtype,
            dit_only=args.dit_only, ema=args.ema,
        )  # fmt: skip
    except (FileNotFoundError, CheckpointError, CheckpointReadError, MergeMismatch) as e:
        logger.error("%s", e)
        # A file the safe loader refused (hostile, or pointing outside the folder): exit 2, like the trainer.
        return 2 if is_refusal(e) else 1
    merged = (
        f"; merged onto {args.merge_onto}: replaced {result.report.replaced}, added {result.report.added}, "
        f"kept {result.report.kept} of other families"
        if result.report is not None
        else ""
    )
    per_family = ", ".join(f"{name} {n}" for name, n in result.families.items())
    logger.info(
        "wrote %s: %d tensors (%s) from %s%s", result.output, result.tensors, per_family, result.checkpoint, merged
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
