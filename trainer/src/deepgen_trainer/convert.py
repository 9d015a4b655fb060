"""RL checkpoint → ``.pth`` flat state dict with the SFT DeepGen model's key names.

The RL checkpoint stores the DiT with diffusers ``SD3Transformer2DModel`` names
(``transformer_blocks.0.attn.to_q.weight``); the SFT DeepGen model (an xtuner model with submodules
``lmm``, ``connector``, ``transformer``, ``vae``, ...) holds the DiT under ``transformer.`` and is loaded
with ``load_state_dict(strict=False)`` via xtuner's ``guess_load_checkpoint``. Converting is therefore
prefixing every key with ``transformer.``; ``--merge-onto SFT.pth`` instead overwrites the DiT entries
of the SFT checkpoint, so the result is self-contained (VLM, connector, VAE and the RL-trained DiT).

    python -m deepgen_trainer.convert outputs/run1                        # latest complete checkpoint
    python -m deepgen_trainer.convert outputs/run1/checkpoint-500 --merge-onto sft.pth --dtype bf16

Inputs are read without arbitrary unpickling (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import Tensor

from deepgen_trainer.checkpoint import CheckpointError, load_trainable, resolve_checkpoint

logger = logging.getLogger(__name__)

SFT_PREFIX = "transformer."
DtypeName = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MergeMismatch(ValueError):
    """The RL DiT does not fit the SFT checkpoint's DiT (different shapes: another architecture)."""


@dataclass(frozen=True)
class MergeReport:
    """What `merge_onto` did: DiT entries replaced, added (absent from the SFT checkpoint), and SFT DiT
    entries the RL checkpoint lacks (kept from the SFT checkpoint); `kept` counts the non-DiT entries."""

    replaced: int
    added: int
    untouched_dit: int
    kept: int


def to_sft_keys(trainable: Mapping[str, Tensor], prefix: str = SFT_PREFIX) -> dict[str, Tensor]:
    """``{prefix + name: tensor}``: diffusers DiT names → SFT model names."""
    return {prefix + name: t for name, t in trainable.items()}


def merge_onto(
    base: Mapping[str, Tensor], dit: Mapping[str, Tensor], prefix: str = SFT_PREFIX, source: str = "the SFT checkpoint"
) -> tuple[dict[str, Tensor], MergeReport]:
    """`base` (an SFT state dict) with its `prefix` entries overwritten by `dit` (already prefixed).

    Raises MergeMismatch listing the keys whose shapes differ. Keys of `dit` absent from `base` are
    added; `base` DiT keys absent from `dit` are kept and counted in `untouched_dit`. `source` names
    `base` in errors.
    """
    mismatched = [
        f"{k}: RL {tuple(t.shape)} vs SFT {tuple(base[k].shape)}"
        for k, t in dit.items()
        if k in base and base[k].shape != t.shape
    ]
    if mismatched:
        shown = "\n  ".join(mismatched[:10])
        more = f"\n  ... and {len(mismatched) - 10} more" if len(mismatched) > 10 else ""
        raise MergeMismatch(
            f"{len(mismatched)} DiT tensors differ in shape from {source} (is it the same model?):\n  {shown}{more}"
        )
    base_dit = {k for k in base if k.startswith(prefix)}
    merged = dict(base)
    merged.update(dit)
    report = MergeReport(
        replaced=len(base_dit & dit.keys()),
        added=len(dit.keys() - base.keys()),
        untouched_dit=len(base_dit - dit.keys()),
        kept=len(base) - len(base_dit),
    )
    if not base_dit:
        logger.warning("the SFT checkpoint has no '%s*' entries: all %d DiT tensors are added", prefix, len(dit))
    elif report.untouched_dit:
        logger.warning("%d SFT DiT tensors are not in the RL checkpoint; kept from SFT", report.untouched_dit)
    return merged, report


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A flat state dict from ``.safetensors`` or a ``torch.save``-d ``.pth``/``.pt`` (weights_only).

    A top-level ``{"state_dict": {...}}`` wrapper is unwrapped, as xtuner's ``guess_load_checkpoint`` does.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"state dict file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError for pickled non-tensor objects, RuntimeError for bad files
        raise CheckpointError(
            f"cannot load {path} with torch.load(weights_only=True): {e}. Only flat tensor state dicts are "
            "accepted; re-save it as a plain {name: tensor} dict or as .safetensors"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a flat {{name: tensor}} state dict")
    return obj


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
    tensors: int
    report: MergeReport | None


def convert(
    checkpoint: str | Path,
    output: str | Path | None = None,
    *,
    merge_onto_path: str | Path | None = None,
    dtype: DtypeName | None = None,
) -> ConvertResult:
    """Write the SFT-named state dict of `checkpoint` (a checkpoint dir, or an output dir → its latest).

    `output` defaults to ``<checkpoint dir>.pth`` (``.merged.pth`` with `merge_onto_path`), next to the
    checkpoint directory. `dtype` casts every floating-point tensor of the result; None keeps dtypes.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; valid: {sorted(DTYPES)} or None to keep")
    ckpt = resolve_checkpoint(checkpoint)
    if output is None:
        output = ckpt.with_name(ckpt.name + (".merged.pth" if merge_onto_path is not None else ".pth"))
    logger.info("converting %s", ckpt)
    state = to_sft_keys(load_trainable(ckpt))
    report = None
    if merge_onto_path is not None:
        logger.info("merging onto %s", merge_onto_path)
        state, report = merge_onto(load_state_dict_file(merge_onto_path), state, source=str(merge_onto_path))
    if dtype is not None:
        state = cast_floating(state, DTYPES[dtype])
    save_state_dict_atomic(state, output)
    return ConvertResult(checkpoint=ckpt, output=Path(output), tensors=len(state), report=report)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepgen_trainer.convert",
        description="RL checkpoint -> .pth state dict with SFT DeepGen key names (load_state_dict(strict=False)).",
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoint-<step> dir, or an output dir (its latest)")
    parser.add_argument("--output", type=Path, default=None, help="default: <checkpoint dir>[.merged].pth")
    parser.add_argument("--merge-onto", type=Path, default=None, help="SFT .pth/.safetensors to merge onto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default keep)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = convert(args.checkpoint, args.output, merge_onto_path=args.merge_onto, dtype=args.dtype)
    except (FileNotFoundError, CheckpointError, MergeMismatch) as e:
        logger.error("%s", e)
        return 1
    merged = (
        f", merged onto {args.merge_onto}: replaced {result.report.replaced}, added {result.report.added}, "
        f"kept {result.report.kept} non-DiT"
        if result.report is not None
        else ""
    )
    logger.info("wrote %s: %d tensors from %s%s", result.output, result.tensors, result.checkpoint, merged)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
