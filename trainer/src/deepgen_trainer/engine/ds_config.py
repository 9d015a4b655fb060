"""DeepSpeed configs (``trainer/deepspeed/*.json``) with their "auto" values resolved from the `TrainConfig`.

DeepSpeed itself resolves "auto" only through the Hugging Face integration, so the trainer fills in
the batch, clipping and precision settings here, from the same flags the training loop uses:

- ``train_micro_batch_size_per_gpu`` = ``--atrain_micro_batch_size``;
- ``gradient_accumulation_steps`` = backward passes per optimizer step
  (`TrainConfig.gradient_accumulation_steps`: 1 with ``--step_per_backward``);
- ``train_batch_size`` = micro batch × accumulation × world size;
- ``gradient_clipping`` = ``--max_grad_norm``; ``bf16.enabled`` = ``--bf16``; ``fp16.enabled`` = false;
- ``data_types.grad_accum_dtype`` = "fp32" (bf16 weights, float32 gradient partitions: a step's backward
  passes and its small terms, λ·L_sft with λ = 1e-4, would round away in a bf16 sum).

A value written out instead of "auto" must agree with the flags (else the loop and DeepSpeed would
disagree on when to step). The configs carry no ``optimizer`` or ``scheduler`` block: the trainer
passes a torch AdamW and its own LR schedule, because DeepSpeed's fused Adam is JIT-compiled on first
use (minutes on CPU); ``zero_allow_untested_optimizer`` lets ZeRO accept the torch optimizer.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from deepgen_trainer.config import ConfigError, TrainConfig, deepspeed_config_path


def deepspeed_config(name_or_path: str | Path, cfg: TrainConfig, world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed config dict for ``deepspeed.initialize(config=...)``, with no "auto" left."""
    path = deepspeed_config_path(name_or_path)
    if path is None:
        raise ConfigError("--deepspeed none means plain PyTorch DDP: there is no DeepSpeed config to build")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e}); fix the file") from e
    return resolve_deepspeed_config(config, cfg, world_size, source=str(path))


def resolve_deepspeed_config(
    config: dict[str, Any], cfg: TrainConfig, world_size: int = 1, source: str = "deepspeed config"
) -> dict[str, Any]:
    """A copy of ``config`` with the "auto" values filled in from ``cfg``; see the module docstring."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for block in ("optimizer", "scheduler"):
        if block in config:
            raise ConfigError(
                f"{source}: remove the '{block}' block; the trainer passes a torch AdamW and its own LR schedule "
                "(set --learning_rate, --lr_scheduler_type and --warmup_steps instead)"
            )
    micro = cfg.atrain_micro_batch_size
    accumulation = cfg.gradient_accumulation_steps(world_size)
    resolved: dict[tuple[str, ...], tuple[Any, str]] = {
        ("train_micro_batch_size_per_gpu",): (micro, "--atrain_micro_batch_size"),
        ("gradient_accumulation_steps",): (accumulation, "the backward passes per step"),
        ("train_batch_size",): (micro * accumulation * world_size, "micro batch × accumulation × world size"),
        ("gradient_clipping",): (cfg.max_grad_norm, "--max_grad_norm"),
        ("bf16", "enabled"): (cfg.bf16, "--bf16/--no-bf16"),
        ("fp16", "enabled"): (False, "bf16 or fp32 (fp16 is not supported)"),
        ("data_types", "grad_accum_dtype"): (
            "fp32",
            "float32 gradient accumulation: in bf16 the ~30 backward "
            "passes of a step and the small loss terms (β·KL, λ·L_sft) round away",
        ),
    }
    out = copy.deepcopy(config)
    for key_path, (value, origin) in resolved.items():
        parent = out
        for key in key_path[:-1]:
            parent = parent.setdefault(key, {})
        key = key_path[-1]
        current = parent.get(key, "auto")
        if current != "auto" and current != value:
            raise ConfigError(
                f"{source}: {'.'.join(key_path)} is {current!r} but the trainer's flags give {value!r} "
                f'({origin}); set it to "auto"'
            )
        parent[key] = value
    out["zero_allow_untested_optimizer"] = True
    _reject_auto(out, source, ())
    return out


def _reject_auto(node: Any, source: str, key_path: tuple[str, ...]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _reject_auto(value, source, (*key_path, key))
    elif node == "auto":
        raise ConfigError(f'{source}: {".".join(key_path)} is "auto" but the trainer cannot resolve it; set a value')
