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

The original DeepGen-RL's JSONs (``scripts/deepspeed/*.json``) run as shipped; their "auto" values are
filled as Hugging Face's integration fills them (ORIGINAL.md §8), and where they differ from ours one
INFO line says so:

- an ``optimizer`` block (AdamW or Adam) is honoured: DeepSpeed builds the optimizer, with ``lr`` =
  ``--learning_rate`` and betas (0.9, 0.999), eps 1e-8, weight decay 0 (HF's defaults, which the
  original never changed) for "auto"; a written value must agree, as HF requires. On CPU it is a
  torch AdamW (``torch_adam``) instead of DeepSpeed's JIT-compiled Adam. A ``scheduler`` block is
  replaced by the trainer's schedule (``--lr_scheduler_type``), with one INFO line;
- fixed ``train_batch_size`` / ``train_micro_batch_size_per_gpu`` (``zero3.json``'s 32 / 1, written
  for 32 GPUs with one prompt each) are DeepSpeed's bookkeeping only (the loop's batches come from
  the flags), so they are reconciled: replaced by the values of the flags, with one INFO line; a fixed
  ``gradient_accumulation_steps`` 1 is the original's "one optimizer step per rollout" (HF counted
  rollouts), as here; any other value that disagrees is refused with the fix;
- ZeRO-3's hidden-size "auto" keys (``reduce_bucket_size`` h², ``stage3_prefetch_bucket_size``
  0.9·h², ``stage3_param_persistence_threshold`` 10·h) use the trained DiT's hidden size h (the
  original's HF integration used the frozen VLM's, ORIGINAL.md §8).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from deepgen_trainer.config import ConfigError, TrainConfig, deepspeed_config_path

log = logging.getLogger(__name__)


def deepspeed_config(
    name_or_path: str | Path, cfg: TrainConfig, world_size: int = 1, hidden_size: int | None = None, cpu: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config dict for ``deepspeed.initialize(config=...)``, with no "auto" left."""
    path = deepspeed_config_path(name_or_path)
    if path is None:
        raise ConfigError("--deepspeed none means plain PyTorch DDP: there is no DeepSpeed config to build")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e}); fix the file") from e
    return resolve_deepspeed_config(config, cfg, world_size, source=str(path), hidden_size=hidden_size, cpu=cpu)


def resolve_deepspeed_config(
    config: dict[str, Any],
    cfg: TrainConfig,
    world_size: int = 1,
    source: str = "deepspeed config",
    hidden_size: int | None = None,
    cpu: bool = False,
) -> dict[str, Any]:
    """A copy of ``config`` with the "auto" values filled in from ``cfg``; see the module docstring.
    ``hidden_size``: the DiT's, for ZeRO-3's bucket sizes; ``cpu``: DeepSpeed runs on the CPU."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    out = copy.deepcopy(config)
    if "scheduler" in out:
        log.info(
            "%s: its 'scheduler' block (%s) is replaced by the trainer's schedule (--lr_scheduler_type %s, "
            "--warmup_steps %d), which ticks once per optimizer step",
            source, out.pop("scheduler").get("type"), cfg.lr_scheduler_type, cfg.warmup_steps,
        )  # fmt: skip
    micro = cfg.atrain_micro_batch_size
    accumulation = cfg.gradient_accumulation_steps(world_size)
    _reconcile_batch(out, source, micro, accumulation, world_size)
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
    if "optimizer" in out:
        resolved |= _optimizer_values(out, cfg, source)
    if hidden_size is not None:
        zero = ("zero_optimization",)
        resolved[(*zero, "reduce_bucket_size")] = (hidden_size * hidden_size, "the DiT's hidden size²")
        resolved[(*zero, "stage3_prefetch_bucket_size")] = (int(0.9 * hidden_size**2), "0.9 × the DiT's hidden size²")
        resolved[(*zero, "stage3_param_persistence_threshold")] = (10 * hidden_size, "10 × the DiT's hidden size")
    for key_path, (value, origin) in resolved.items():
        parent = out
        for key in key_path[:-1]:
            parent = parent.setdefault(key, {})
        key = key_path[-1]
        current = parent.get(key, "auto")
        if key_path[0] == "zero_optimization" and current != "auto":
            continue  # a bucket size the file sets, or leaves to DeepSpeed's default
        if current != "auto" and current != value:
            raise ConfigError(
                f"{source}: {'.'.join(key_path)} is {current!r} but the trainer's flags give {value!r} "
                f'({origin}); set it to "auto"'
            )
        parent[key] = value
    out["zero_allow_untested_optimizer"] = True
    if "optimizer" in out and cpu:
        # DeepSpeed's own Adam is a C++/CUDA extension built on first use (minutes on CPU): a torch AdamW
        # with the same settings, which ZeRO-Offload must then be told to accept.
        out["optimizer"].setdefault("params", {})["torch_adam"] = True
        out["zero_force_ds_cpu_optimizer"] = False
    _reject_auto(out, source, ())
    return out


_ADAM_TYPES = ("adam", "adamw")


def _optimizer_values(config: dict[str, Any], cfg: TrainConfig, source: str) -> dict[tuple[str, ...], tuple]:
    """The optimizer block's "auto" values (HF's: the learning rate, and AdamW defaults the original never
    changed). Only Adam/AdamW: the trainer's update, schedule and checkpoints assume it."""
    kind = str(config["optimizer"].get("type", ""))
    if kind.lower() not in _ADAM_TYPES:
        raise ConfigError(
            f'{source}: optimizer type {kind!r} is not supported; use "AdamW" (DeepSpeed builds it with '
            "--learning_rate) or remove the 'optimizer' block (the trainer then passes a torch AdamW)"
        )
    log.info("%s: DeepSpeed builds the %s of its 'optimizer' block (lr --learning_rate %g)", source, kind,
             cfg.learning_rate)  # fmt: skip
    params = ("optimizer", "params")
    return {
        (*params, "lr"): (cfg.learning_rate, "--learning_rate"),
        (*params, "betas"): ([0.9, 0.999], "AdamW's betas, as the trainer's own"),
        (*params, "eps"): (1e-8, "AdamW's eps, as the trainer's own"),
        (*params, "weight_decay"): (0.0, "no weight decay, as the trainer's own"),
    }


def _reconcile_batch(config: dict[str, Any], source: str, micro: int, accumulation: int, world_size: int) -> None:
    """Fixed batch values of an original JSON: bookkeeping for DeepSpeed (replaced by the flags' values,
    one INFO line), except an accumulation that would change when the optimizer steps (refused)."""
    fixed_accumulation = config.get("gradient_accumulation_steps", "auto")
    if fixed_accumulation not in ("auto", accumulation, 1):
        raise ConfigError(
            f"{source}: gradient_accumulation_steps is {fixed_accumulation!r} but the trainer's flags give "
            f'{accumulation} (the backward passes per step); set it to "auto" (or 1: one optimizer step per rollout, '
            "as the original's HF integration counted it); choose optimizer steps per rollout with "
            "--optimizer_steps_per_rollout"
        )
    wanted = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
    }
    changed = {k: (config[k], v) for k, v in wanted.items() if config.get(k, "auto") not in ("auto", v)}
    if changed:
        log.info(
            "%s: fixed batch values %s are DeepSpeed's bookkeeping only (HF counted prompts and rollouts); "
            "the batches come from the flags, so DeepSpeed gets %s",
            source, {k: old for k, (old, _) in changed.items()}, {k: new for k, (_, new) in changed.items()},
        )  # fmt: skip
        config.update({k: new for k, (_, new) in changed.items()})


def _reject_auto(node: Any, source: str, key_path: tuple[str, ...]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _reject_auto(value, source, (*key_path, key))
    elif node == "auto":
        raise ConfigError(f'{source}: {".".join(key_path)} is "auto" but the trainer cannot resolve it; set a value')
