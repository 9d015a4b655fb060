"""The original DeepGen-RL's command-line flags that this trainer names differently, or has no use for.

Flags the original shares with this trainer (``--rollout_n``, ``--beta``, ``--deepspeed``, ...) are
plain flags of `deepgen_trainer.config`. The others (the original's ``deepgen_rl/grpo_deepgen.py``
argparse is the authority) are accepted here, never silently ignored:

- translated into this trainer's vocabulary, with one INFO line saying what they became
  (``--rollout_global_batch_size 256`` → ``--prompts_per_step 32``, ``--ema_diffusion`` →
  ``--ema_decay``, ``--atrain_num_actor_update_steps`` → ``--optimizer_steps_per_rollout``);
- accepted with a one-line notice where they have no effect here (``--log_prob_micro_batch_size``,
  unused in the original too; ``--dataloader_num_workers``; ``--local_rank``);
- refused, naming the replacement, where the original itself refused them (its deprecated
  ``--num_generations``, ``--per_device_train_batch_size``, ``--gradient_accumulation_steps``).

None of the translations reproduces one of the original's defects: the original re-rolled the same
prompts when ``--rollout_global_batch_size`` exceeded ``rollout_micro_batch_size × world size``
(ORIGINAL.md §3) where this trainer draws distinct prompts, and its ``--ema_diffusion`` EMA never
moved (§0.2) where ``--ema_decay``'s does.

Imports nothing else of the trainer: `translate` returns field overrides and notices, and raises
`OriginalFlagError`, which `deepgen_trainer.config` turns into its own error.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

DEST_PREFIX = "original__"

Handling = Literal["translated", "no_effect", "refused"]


class OriginalFlagError(ValueError):
    """An original flag whose value cannot be used here; the message says what to pass instead."""


@dataclass(frozen=True)
class OriginalFlag:
    """One flag of the original's entry point that this trainer does not have under that name."""

    name: str
    type: type
    default: Any  # the original's default (documentation; a flag not given changes nothing)
    handling: Handling
    help: str


ORIGINAL_FLAGS: tuple[OriginalFlag, ...] = (
    OriginalFlag(
        "rollout_global_batch_size", int, 256, "translated",
        "the original's images per step over all GPUs: becomes --prompts_per_step (this value / --rollout_n)",
    ),
    OriginalFlag(
        "atrain_global_batch_size", int, 256, "translated",
        "the original's images per optimizer step: checked (× --atrain_num_actor_update_steps <= the rollout's "
        "images, as the original does); every optimizer step here trains on the whole rollout, as the original's did",
    ),
    OriginalFlag(
        "atrain_num_actor_update_steps", int, 1, "translated",
        "the original's actor updates per rollout: becomes --optimizer_steps_per_rollout",
    ),
    OriginalFlag(
        "ema_diffusion", float, 0.0, "translated",
        "the original's EMA decay: becomes --ema_decay (and --eval_with_ema when > 0)",
    ),
    OriginalFlag(
        "log_prob_micro_batch_size", int, None, "no_effect",
        "no effect (unused in the original too): old log-probs come from the rollout itself",
    ),
    OriginalFlag(
        "dataloader_num_workers", int, 4, "no_effect",
        "no effect: the prompts are held in memory and dealt by the prompt sampler, no loader workers",
    ),
    OriginalFlag(
        "local_rank", int, -1, "no_effect",
        "no effect: torchrun sets LOCAL_RANK, which the trainer reads",
    ),
    OriginalFlag(
        "num_generations", int, None, "refused", "refused, as by the original: use --rollout_n",
    ),
    OriginalFlag(
        "per_device_train_batch_size", int, None, "refused",
        "refused, as by the original: use --prompts_per_rank (prompts per GPU) or --rollout_micro_batch_size",
    ),
    OriginalFlag(
        "gradient_accumulation_steps", int, None, "refused",
        "refused, as by the original: use --optimizer_steps_per_rollout (or --atrain_num_actor_update_steps)",
    ),
)  # fmt: skip
_BY_NAME = {flag.name: flag for flag in ORIGINAL_FLAGS}


def add_original_flags(parser: argparse.ArgumentParser) -> None:
    """Register the flags of `ORIGINAL_FLAGS` (default None: not given; each takes a number)."""
    for flag in ORIGINAL_FLAGS:
        parser.add_argument(
            f"--{flag.name}", dest=DEST_PREFIX + flag.name, metavar=flag.name.upper(), type=flag.type, default=None,
            help=f"[the original DeepGen-RL's] {flag.help}",
        )  # fmt: skip


def pop_original_flags(namespace: argparse.Namespace) -> dict[str, Any]:
    """The original flags given on the command line (all removed from the namespace), by name."""
    given = {}
    for name in list(vars(namespace)):
        if name.startswith(DEST_PREFIX):
            if getattr(namespace, name) is not None:
                given[name.removeprefix(DEST_PREFIX)] = getattr(namespace, name)
            delattr(namespace, name)
    return given


def translate(given: Mapping[str, Any], ours: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[dict, list]:
    """This trainer's field values for the original flags ``given``, and one notice per flag.

    Args:
        given: original flag name → value, as on the command line.
        ours: this trainer's parsed field values (before the translation).
        defaults: this trainer's field defaults (a field that differs from it was set explicitly).

    Returns:
        (field overrides, INFO lines).

    Raises:
        OriginalFlagError: a refused flag, a value that does not translate, or a translation that
            contradicts an explicitly set flag of this trainer.
    """
    overrides: dict[str, Any] = {}
    notices: list[str] = []

    def set_field(field: str, value: Any, source: str) -> None:
        if ours[field] != defaults[field] and ours[field] != value:
            raise OriginalFlagError(
                f"{source} means --{field} {value}, but --{field} {ours[field]} is also given; pass only one of them"
            )
        overrides[field] = value

    for name, value in given.items():
        flag = _BY_NAME[name]
        source = f"--{name} {value}"
        if flag.handling == "refused":
            raise OriginalFlagError(f"{source}: {flag.help}")
        if flag.handling == "no_effect":
            notices.append(f"{source}: {flag.help}")
        elif name == "rollout_global_batch_size":
            n = ours["rollout_n"]
            if value < n or value % n:
                raise OriginalFlagError(
                    f"{source} counts images, whole groups of --rollout_n {n}: pass a multiple of {n}, or "
                    f"--prompts_per_step / --prompts_per_rank directly"
                )
            set_field("prompts_per_step", value // n, source)
            notices.append(
                f"{source} = --prompts_per_step {value // n} ({value} images / --rollout_n {n}, spread over the "
                "ranks; e.g. 4 prompts × 8 images per rank on 8 ranks for 256); where the original re-rolled the "
                "same prompts to fill the count, every image group here has its own prompt"
            )
        elif name == "atrain_num_actor_update_steps":
            if value < 1:
                raise OriginalFlagError(f"{source}: must be >= 1")
            set_field("optimizer_steps_per_rollout", value, source)
            notices.append(
                f"{source} = --optimizer_steps_per_rollout {value}: {value} real optimizer step(s) per rollout, "
                "each on a consecutive share of the trained timesteps (the original split the samples but stepped "
                "only once, ORIGINAL.md §3)"
            )
        elif name == "ema_diffusion":
            set_field("ema_decay", value, source)
            if value > 0:  # the original evaluated under its EMA
                set_field("eval_with_ema", True, source)
            notices.append(
                f"{source} = --ema_decay {value}{' --eval_with_ema' if value > 0 else ''}: the DiT's EMA moves after "
                "every optimizer step and evaluation uses it (the original's EMA never moved, ORIGINAL.md §0.2)"
            )
        elif name == "atrain_global_batch_size":
            notices.append(_check_atrain_global_batch(value, given, ours))
    return overrides, notices


def _check_atrain_global_batch(value: int, given: Mapping[str, Any], ours: Mapping[str, Any]) -> str:
    updates = given.get("atrain_num_actor_update_steps", ours["optimizer_steps_per_rollout"])
    rollout = given.get("rollout_global_batch_size")
    if value < 1:
        raise OriginalFlagError(f"--atrain_global_batch_size {value}: must be >= 1")
    if rollout is not None and value * updates > rollout:
        raise OriginalFlagError(
            f"--atrain_global_batch_size {value} × {updates} actor update(s) exceeds --rollout_global_batch_size "
            f"{rollout} (the original's own check): lower it to at most {rollout // updates}"
        )
    return (
        f"--atrain_global_batch_size {value}: accepted; each optimizer step trains on every rollout image (as the "
        "original did whatever this value: it only set HF's gradient accumulation, ORIGINAL.md §3); choose the "
        "optimizer steps per rollout with --atrain_num_actor_update_steps / --optimizer_steps_per_rollout"
    )


def translate_report_to(names: tuple[str, ...]) -> tuple[tuple[str, ...], list[str]]:
    """The original's ``--report_to`` values (HF's: wandb, tensorboard, mlflow, comet_ml, all, none,
    plus swanlab) as this trainer's trackers, with a notice for each one it does not have."""
    have = ("wandb", "swanlab")
    out: list[str] = []
    notices = []
    for name in names:
        if name == "all":
            out += [t for t in have if t not in out]
            notices.append("--report_to all = wandb,swanlab (the trackers this trainer has)")
        elif name in ("tensorboard", "mlflow", "comet_ml"):
            notices.append(
                f"--report_to {name}: no such tracker here (wandb, swanlab); every step's metrics are also in "
                "<output_dir>/metrics.jsonl"
            )
        elif name not in out:
            out.append(name)
    return tuple(out), notices
