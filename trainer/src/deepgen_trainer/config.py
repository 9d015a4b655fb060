"""The trainer's flags: one typed, frozen config, parsed from the command line and checked in one place.

Flag names and defaults are the seed's (DESIGN §4 "Flags"). Every field is a ``--flag`` of the same
name; booleans also get ``--no-flag`` (``--no-gradient_checkpointing``). Deployment facts (model
paths, service URLs, output and data-config paths) fall back to environment variables when the flag
is not given: the flag is the variable's name in lower case (``--ocr_url`` ← ``OCR_URL``), and
`deployment_env` is the only function that reads the environment. Algorithm switches never come from
the environment.

Validation lives in `TrainConfig.__post_init__`, so a config from the command line, from a saved run
(`TrainConfig.from_dict`) or built in code is checked the same way; every message says how to fix it.
Checks that need the world size (the per-rank batch when ``--prompts_per_step`` is global) are in
`TrainConfig.prompts_per_rank_for`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from deepgen_common.client.urls import parse_service_url
from deepgen_trainer.algorithms.advantages import ADVANTAGE_TYPES, GROUP_NORMALISING_TYPES, AdvantageType
from deepgen_trainer.algorithms.policy_loss import KL_TYPES, KLType
from deepgen_trainer.algorithms.sde import LOGPROB_MIN_STD, SAMPLERS, Sampler

ModelKind = Literal["hf", "tiny"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
LrSchedulerType = Literal["constant", "constant_with_warmup", "linear", "cosine"]
LR_SCHEDULER_TYPES: tuple[str, ...] = get_args(LrSchedulerType)
REPORT_TO: tuple[str, ...] = ("wandb", "swanlab")
DEFAULT_REPORT_TO: tuple[str, ...] = ("wandb", "swanlab")  # the seed's; both offline unless WANDB_MODE / SWANLAB_MODE
DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "deepspeed"
DEEPSPEED_CONFIG_NAMES: tuple[str, ...] = ("zero2", "zero3", "zero3_offload", "zero3_sd3")
# The latent is the image / 8 (VAE) split in 2×2 patches (DiT): image sides must divide by 16.
IMAGE_SIDE_MULTIPLE = 16

# Environment variables of the seed that are deployment facts, and the field each one backs.
ENV_FIELDS: dict[str, str] = {
    name: name.lower()
    for name in (
        "SD3_5_MODEL_NAME_OR_PATH",
        "QWEN2_5_VL_MODEL_NAME_OR_PATH",
        "CLIP_MODEL_NAME_OR_PATH",
        "CHECKPOINT",
        "OUTPUT_DIR",
        "OCR_URL",
        "UNIFIEDREWARD_THINK_URL",
        "UNIGENBENCH_API_URL",
        "DATASET_CONFIG",
        "EVAL_DATASET_CONFIG",
        "SFTAUX_DATASET_CONFIG",
        "METRICS_PORT",
    )
}


class ConfigError(ValueError):
    """A flag value that cannot be used; the message names the flag and says how to fix it."""


def deepspeed_config_path(name_or_path: str | Path) -> Path | None:
    """The DeepSpeed JSON file of a config name (``zero2``, ...) or a path to a .json file; None for
    ``none`` (plain PyTorch DDP)."""
    if str(name_or_path) == "none":
        return None
    if str(name_or_path) in DEEPSPEED_CONFIG_NAMES:
        return DEEPSPEED_DIR / f"{name_or_path}.json"
    path = Path(name_or_path)
    if path.suffix != ".json" or not path.is_file():
        raise ConfigError(
            f"--deepspeed {str(name_or_path)!r} is neither a config name ({', '.join(DEEPSPEED_CONFIG_NAMES)}), "
            "none (plain PyTorch DDP) nor an existing .json file; pass one of those"
        )
    return path


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    # Model and deployment (flag or env).
    model: ModelKind = field(default="hf", metadata=_help("hf: weights from the env paths; tiny: a random tiny model"))
    sd3_5_model_name_or_path: str | None = field(default=None, metadata=_help("SD3.5 DiT + VAE folder (HF format)"))
    qwen2_5_vl_model_name_or_path: str | None = field(default=None, metadata=_help("Qwen2.5-VL folder (HF format)"))
    clip_model_name_or_path: str | None = field(default=None, metadata=_help("CLIP folder of the clip_sim reward"))
    checkpoint: str | None = field(
        default=None, metadata=_help("SFT checkpoint to start from: .pth/.safetensors, DeepSpeed or mmengine folder")
    )
    allow_partial_checkpoint: bool = field(
        default=False, metadata=_help("train even if the checkpoint leaves DeepGen-only weights or the LoRA at init")
    )
    output_dir: str = field(default="outputs", metadata=_help("run folder: checkpoints, resolved config, logs"))
    ocr_url: str | None = field(
        default=None,
        metadata=_help("reward-ocr: http(s)://host:port or grpc(s)://host:port, several comma-separated addresses"),
    )
    unifiedreward_think_url: str | None = field(default=None, metadata=_help("reward-unified URL (as --ocr_url)"))
    unigenbench_api_url: str | None = field(default=None, metadata=_help("eval-unigenbench URL (as --ocr_url)"))
    dataset_config: str | None = field(default=None, metadata=_help("train prompt YAML"))
    eval_dataset_config: str | None = field(default=None, metadata=_help("eval prompt YAML"))
    sftaux_dataset_config: str | None = field(default=None, metadata=_help("SFT-aux image-caption YAML"))
    metrics_port: int | None = field(
        default=None, metadata=_help("serve the step metrics for Prometheus on this port (rank 0; 0: any free port)")
    )
    # Rollout.
    rollout_n: int = field(default=8, metadata=_help("images per prompt (the GRPO group)"))
    prompts_per_rank: int = field(default=4, metadata=_help("prompts per GPU per step"))
    prompts_per_step: int | None = field(
        default=None, metadata=_help("prompts per step over all GPUs (overrides --prompts_per_rank)")
    )
    rollout_micro_batch_size: int = field(default=32, metadata=_help("images per GPU per generation pass"))
    vae_batch_size: int = field(
        default=8, metadata=_help("images per VAE decode / encode call (32 at once take ~12 GiB at 512², 8 ~3 GiB)")
    )
    num_inference_steps: int = field(default=50, metadata=_help("SDE steps per rollout"))
    image_height: int = 512
    image_width: int = 512
    cfg_scale: float = field(default=0.0, metadata=_help("rollout CFG scale (0: conditional only)"))
    sde_eta: float = field(default=1.0, metadata=_help("SDE noise level η"))
    init_same_noise: bool = field(default=True, metadata=_help("one initial noise per group"))
    # Policy update.
    atrain_sde_sampler: Sampler = field(default="cps_sde", metadata=_help(f"one of {', '.join(SAMPLERS)}"))
    exact_logprob: bool = field(default=False, metadata=_help("cps_sde: exact Gaussian log-prob"))
    logprob_min_std: float = field(
        default=LOGPROB_MIN_STD,
        metadata=_help("floor on the SDE noise std in the log-prob and the KL (keeps the step to σ' ≈ 0 well scaled)"),
    )
    atrain_adv_type: AdvantageType = field(default="gdpo", metadata=_help(f"one of {', '.join(ADVANTAGE_TYPES)}"))
    adv_eps: float = 1e-4
    adv_clip: float = 5.0
    global_adv_stats: bool = field(default=False, metadata=_help("batch advantage statistics over all ranks"))
    atrain_kl_type: KLType = field(default="v-based", metadata=_help(f"one of {', '.join(KL_TYPES)}"))
    beta: float = field(default=5e-7, metadata=_help("KL coefficient (0: no reference model)"))
    clip_range: float = 1e-4
    timestep_fraction: float = field(default=0.6, metadata=_help("fraction of the SDE steps trained on, in (0, 1]"))
    atrain_micro_batch_size: int = field(default=32, metadata=_help("samples per GPU per training forward"))
    sftaux_coef: float = field(default=1e-4, metadata=_help("λ of (1 − λ)·L_grpo + λ·L_sft, in [0, 1]"))
    # Optimisation.
    learning_rate: float = 2e-6
    lr_scheduler_type: LrSchedulerType = "constant_with_warmup"
    warmup_steps: int = 20
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping (0: off)"))
    num_train_epochs: float = 1.0
    max_steps: int = field(default=-1, metadata=_help("steps to train; -1: --num_train_epochs of the prompts"))
    optimizer_steps_per_rollout: int = field(
        default=1, metadata=_help("optimizer steps per rollout batch, over consecutive chunks of the trained steps")
    )
    step_per_backward: bool = field(
        default=False,
        metadata=_help("emulate the reference: an optimizer step after every backward (--optimizer_steps_per_rollout "
                       "= the backward passes)"),
    )  # fmt: skip
    one_step_off_policy: bool = field(
        default=False, metadata=_help("generate step t+1's rollout while step t's images are scored, then update")
    )
    gradient_checkpointing: bool = True
    bf16: bool = field(default=True, metadata=_help("bf16 mixed precision (--no-bf16: fp32)"))
    deepspeed: str = field(
        default="zero2",
        metadata=_help(f"a config name ({', '.join(DEEPSPEED_CONFIG_NAMES)}), a .json path, or none (plain DDP)"),
    )
    # Reward services.
    reward_ready_timeout: float = field(
        default=600.0, metadata=_help("seconds to wait at start for each reward service to be ready (0: no check)")
    )
    reward_failure_patience: int = field(
        default=3, metadata=_help("consecutive steps a reward may fail for every sample before the run stops")
    )
    # Run.
    seed: int = 42
    save_steps: int = 50
    ema_decay: float = field(default=0.0, metadata=_help("EMA of the DiT with this decay, in [0, 1) (0: off)"))
    eval_with_ema: bool = field(default=False, metadata=_help("evaluate the DiT's EMA (needs --ema_decay)"))
    save_total_limit: int | None = field(default=None, metadata=_help("checkpoints kept (default: all)"))
    eval_freq: int = field(default=10, metadata=_help("evaluate every N steps (0: never)"))
    eval_before_train: bool = False
    eval_cfg_scale: float = 4.0
    report_to: tuple[str, ...] = field(
        default=DEFAULT_REPORT_TO, metadata=_help("comma-separated trackers among wandb,swanlab, or none")
    )

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def num_train_timesteps(self) -> int:
        """SDE steps trained per rollout: int(num_inference_steps · timestep_fraction), at most
        num_inference_steps − 1 because the last (deterministic) step is never trained."""
        return min(int(self.num_inference_steps * self.timestep_fraction), self.num_inference_steps - 1)

    def prompts_per_rank_for(self, world_size: int) -> int:
        """Prompts per rank per step in a run of ``world_size`` ranks (checks the per-rank batch)."""
        if self.prompts_per_step is None:
            return self.prompts_per_rank
        if self.prompts_per_step % world_size:
            raise ConfigError(
                f"--prompts_per_step {self.prompts_per_step} does not divide over {world_size} ranks; "
                f"use a multiple of {world_size}"
            )
        per_rank = self.prompts_per_step // world_size
        _check_rollout_batch(self, per_rank, f"--prompts_per_step {self.prompts_per_step} over {world_size} ranks")
        return per_rank

    def images_per_rank(self, world_size: int) -> int:
        """Rollout images per rank per step (prompts per rank × rollout_n)."""
        return self.prompts_per_rank_for(world_size) * self.rollout_n

    @property
    def uses_sftaux(self) -> bool:
        """The SFT auxiliary loss is on: a dataset is configured and its coefficient is > 0."""
        return self.sftaux_dataset_config is not None and self.sftaux_coef > 0

    def grpo_passes(self, world_size: int) -> int:
        """Backward passes of the policy loss per rollout batch: one per (trained timestep, training
        micro-batch). The SFT auxiliary loss shares the last one's backward."""
        return self.images_per_rank(world_size) // self.atrain_micro_batch_size * self.num_train_timesteps

    def optimizer_steps(self, world_size: int) -> int:
        """Optimizer steps per rollout batch: ``--optimizer_steps_per_rollout``, or every backward pass
        with ``--step_per_backward``."""
        return self.grpo_passes(world_size) if self.step_per_backward else self.optimizer_steps_per_rollout

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """Backward passes per optimizer step: the policy-loss passes of a rollout batch split evenly
        over its optimizer steps (1 with ``--step_per_backward``)."""
        return self.grpo_passes(world_size) // self.optimizer_steps(world_size)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as JSON-ready values (saved in the run folder and in checkpoints)."""
        values = dataclasses.asdict(self)
        values["report_to"] = list(self.report_to)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Rebuild a config from `to_dict` output; unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid keys: {', '.join(sorted(known))}")
        values = dict(values)
        if "report_to" in values:
            values["report_to"] = _report_to(values["report_to"])
        return cls(**values)


def _check_rollout_batch(cfg: TrainConfig, prompts_per_rank: int, source: str) -> None:
    images = prompts_per_rank * cfg.rollout_n
    for flag, size in (
        ("--rollout_micro_batch_size", cfg.rollout_micro_batch_size),
        ("--atrain_micro_batch_size", cfg.atrain_micro_batch_size),
    ):
        if images % size:
            raise ConfigError(
                f"the rollout batch per rank ({source}: {prompts_per_rank} prompts × --rollout_n {cfg.rollout_n} "
                f"= {images} images) is not a multiple of {flag} {size}; set {flag} to a divisor of {images} "
                f"or change the prompts per rank"
            )


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate(cfg: TrainConfig) -> None:
    def one_of(flag: str, value: str, valid: Sequence[str]) -> None:
        _require(value in valid, f"--{flag} {value!r} is unknown; valid values: {', '.join(valid)}")

    one_of("model", cfg.model, MODEL_KINDS)
    one_of("atrain_sde_sampler", cfg.atrain_sde_sampler, SAMPLERS)
    one_of("atrain_adv_type", cfg.atrain_adv_type, ADVANTAGE_TYPES)
    one_of("atrain_kl_type", cfg.atrain_kl_type, KL_TYPES)
    one_of("lr_scheduler_type", cfg.lr_scheduler_type, LR_SCHEDULER_TYPES)
    for flag in ("ocr_url", "unifiedreward_think_url", "unigenbench_api_url"):
        if getattr(cfg, flag):
            try:
                parse_service_url(getattr(cfg, flag))
            except ValueError as exc:
                raise ConfigError(f"--{flag} ({flag.upper()}): {exc}") from None
    for tracker in cfg.report_to:
        _require(
            tracker in REPORT_TO,
            f"--report_to {tracker!r} is unknown; valid values: {','.join(REPORT_TO)} (comma-separated) or none",
        )

    for flag in ("rollout_n", "prompts_per_rank", "rollout_micro_batch_size", "atrain_micro_batch_size", "save_steps",
                 "vae_batch_size"):  # fmt: skip
        value = getattr(cfg, flag)
        _require(value >= 1, f"--{flag} must be >= 1, got {value}")
    _require(
        cfg.rollout_n >= 2 or cfg.atrain_adv_type not in GROUP_NORMALISING_TYPES,
        f"--atrain_adv_type {cfg.atrain_adv_type} normalises within groups of --rollout_n images and needs "
        f"--rollout_n >= 2 (got {cfg.rollout_n}); raise --rollout_n or use --atrain_adv_type reinforcepp",
    )
    _require(cfg.num_inference_steps >= 2, f"--num_inference_steps must be >= 2, got {cfg.num_inference_steps}")
    _require(0 < cfg.timestep_fraction <= 1, f"--timestep_fraction must be in (0, 1], got {cfg.timestep_fraction}")
    _require(
        cfg.num_train_timesteps >= 1,
        f"--timestep_fraction {cfg.timestep_fraction} × --num_inference_steps {cfg.num_inference_steps} trains on "
        f"no step; raise --timestep_fraction to at least {1 / cfg.num_inference_steps:.3g}",
    )
    for flag in ("image_height", "image_width"):
        value = getattr(cfg, flag)
        _require(
            value > 0 and value % IMAGE_SIDE_MULTIPLE == 0,
            f"--{flag} must be a positive multiple of {IMAGE_SIDE_MULTIPLE} (VAE /8, DiT patch 2), got {value}",
        )

    for flag in ("learning_rate", "beta", "cfg_scale", "eval_cfg_scale", "sde_eta", "max_grad_norm"):
        value = getattr(cfg, flag)
        _require(math.isfinite(value) and value >= 0, f"--{flag} must be a finite number >= 0, got {value}")
    for flag in ("clip_range", "adv_eps", "adv_clip", "num_train_epochs"):
        value = getattr(cfg, flag)
        _require(math.isfinite(value) and value > 0, f"--{flag} must be a finite number > 0, got {value}")
    _require(
        math.isfinite(cfg.ema_decay) and 0 <= cfg.ema_decay < 1,
        f"--ema_decay must be in [0, 1) (0 turns the EMA off, 0.999 averages ~1000 steps), got {cfg.ema_decay}",
    )
    _require(
        not cfg.eval_with_ema or cfg.ema_decay > 0,
        "--eval_with_ema evaluates the DiT's EMA, which needs --ema_decay > 0 (e.g. --ema_decay 0.999)",
    )
    _require(0 <= cfg.sftaux_coef <= 1, f"--sftaux_coef must be in [0, 1] (0: no SFT loss), got {cfg.sftaux_coef}")
    _require(
        cfg.optimizer_steps_per_rollout >= 1,
        f"--optimizer_steps_per_rollout must be >= 1, got {cfg.optimizer_steps_per_rollout}",
    )
    _require(
        cfg.optimizer_steps_per_rollout == 1 or not cfg.step_per_backward,
        "--step_per_backward sets the optimizer steps per rollout to the backward passes; drop "
        f"--optimizer_steps_per_rollout {cfg.optimizer_steps_per_rollout} or --step_per_backward",
    )
    _require(
        cfg.num_train_timesteps % cfg.optimizer_steps_per_rollout == 0,
        f"--optimizer_steps_per_rollout {cfg.optimizer_steps_per_rollout} must divide the trained timesteps "
        f"({cfg.num_train_timesteps} = int(--num_inference_steps {cfg.num_inference_steps} × --timestep_fraction "
        f"{cfg.timestep_fraction})): each optimizer step trains on as many timesteps; change either flag",
    )
    _require(
        math.isfinite(cfg.logprob_min_std) and cfg.logprob_min_std >= 0,
        f"--logprob_min_std must be a finite number >= 0 (0: no floor), got {cfg.logprob_min_std}",
    )
    _require(
        math.isfinite(cfg.reward_ready_timeout) and cfg.reward_ready_timeout >= 0,
        f"--reward_ready_timeout must be a finite number of seconds >= 0 (0: no check), got {cfg.reward_ready_timeout}",
    )
    _require(
        cfg.reward_failure_patience >= 1, f"--reward_failure_patience must be >= 1, got {cfg.reward_failure_patience}"
    )
    for flag in ("warmup_steps", "eval_freq", "seed"):
        value = getattr(cfg, flag)
        _require(value >= 0, f"--{flag} must be >= 0, got {value}")
    _require(
        cfg.max_steps == -1 or cfg.max_steps >= 1,
        f"--max_steps must be >= 1, or -1 to train --num_train_epochs, got {cfg.max_steps}",
    )
    _require(
        cfg.save_total_limit is None or cfg.save_total_limit >= 1,
        f"--save_total_limit must be >= 1 (omit it to keep every checkpoint), got {cfg.save_total_limit}",
    )
    _require(
        cfg.prompts_per_step is None or cfg.prompts_per_step >= 1,
        f"--prompts_per_step must be >= 1 (omit it to use --prompts_per_rank), got {cfg.prompts_per_step}",
    )
    if cfg.prompts_per_step is None:
        _check_rollout_batch(cfg, cfg.prompts_per_rank, f"--prompts_per_rank {cfg.prompts_per_rank}")
    _require(
        cfg.rollout_micro_batch_size % cfg.rollout_n == 0,
        f"--rollout_micro_batch_size {cfg.rollout_micro_batch_size} must be a multiple of --rollout_n "
        f"{cfg.rollout_n}: each generation pass is scored as soon as it is decoded, and group rewards need "
        "whole groups",
    )

    deepspeed_config_path(cfg.deepspeed)


# ---------------------------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # Raise instead of exiting so that callers (and tests) see one exception type for bad flags.
        raise ConfigError(f"{message}; see --help for the valid flags")


def deployment_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Field values of the deployment facts set in the environment (the only environment read)."""
    environ = os.environ if environ is None else environ
    return {name: environ[var] for var, name in ENV_FIELDS.items() if environ.get(var)}


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """One ``--flag`` per `TrainConfig` field; env-backed flags default to their environment variable."""
    parser = _Parser(prog="deepgen_trainer", description="MR-GRPO training of DeepGen 1.0.")
    env = deployment_env(environ)
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = env.get(f.name, f.default)
        help_text = f.metadata.get("help", "")
        if f.name in ENV_FIELDS.values():
            help_text += f" [env {f.name.upper()}]"
        kind = _scalar_type(hints[f.name])
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.name == "report_to":
            parser.add_argument(f"--{f.name}", type=_report_to, default=default, help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=f"{help_text} (default: {default})")
    return parser


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Flags > environment (deployment facts only) > defaults, validated. Raises `ConfigError`."""
    namespace = build_parser(environ).parse_args(argv)
    return TrainConfig(**vars(namespace))


def _report_to(value: str | Sequence[str]) -> tuple[str, ...]:
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names if n.strip()]
    return () if names == ["none"] else tuple(names)


def _scalar_type(hint: Any) -> type:
    """str/int/float/bool of a field's annotation (``int | None`` → int, ``Literal[...]`` → str)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
        origin = get_origin(hint)
    if origin is Literal:
        return str
    return hint
