"""The invariants of a `TrainConfig`, checked in a fixed order each time one is built; every message
names the flag and says how to fix it. The per-rank batch of a global ``--prompts_per_step`` needs the
world size: `TrainConfig.prompts_per_rank_for` checks it with `check_rollout_batch`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from deepgen_common.client.urls import parse_service_url
from deepgen_trainer.algorithms.advantages import ADVANTAGE_TYPES, GROUP_NORMALISING_TYPES
from deepgen_trainer.algorithms.diffusion_nft import DECAY_SCHEDULES
from deepgen_trainer.algorithms.policy_loss import KL_TYPES
from deepgen_trainer.algorithms.sde import SAMPLERS
from deepgen_trainer.config.choices import (
    ALGORITHMS,
    EVAL_INFERENCE_MODES,
    MODEL_KINDS,
    NFT_ROLLOUTS,
    REPORT_TO,
    TRACKER_MODES,
    deepspeed_config_path,
    lr_scheduler_types,
)
from deepgen_trainer.config.errors import ConfigError

if TYPE_CHECKING:
    from deepgen_trainer.config.train_config import TrainConfig

# The latent is the image / 8 (VAE) split in 2×2 patches (DiT): image sides must divide by 16.
IMAGE_SIDE_MULTIPLE = 16
# Schedulers that step on a validation metric, which this trainer does not compute per optimizer step.
_METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")


def check_rollout_batch(cfg: TrainConfig, prompts_per_rank: int, source: str) -> None:
    """The rollout batch of ``prompts_per_rank`` prompts splits into whole generation and training
    micro-batches (``source`` says where the prompts per rank came from)."""
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


def validate(cfg: TrainConfig) -> None:
    """Every invariant of ``cfg``, in order; raises `ConfigError` at the first one broken."""
    _validate_names(cfg)
    _validate_step_shape(cfg)
    _validate_numbers(cfg)
    _validate_algorithm(cfg)
    deepspeed_config_path(cfg.deepspeed)
    _validate_original_options(cfg)


def _validate_names(cfg: TrainConfig) -> None:
    """The flags that take a name from a closed set, and the services' URLs."""

    def one_of(flag: str, value: str, valid: Sequence[str]) -> None:
        _require(value in valid, f"--{flag} {value!r} is unknown; valid values: {', '.join(valid)}")

    one_of("model", cfg.model, MODEL_KINDS)
    one_of("atrain_sde_sampler", cfg.atrain_sde_sampler, SAMPLERS)
    one_of("atrain_adv_type", cfg.atrain_adv_type, ADVANTAGE_TYPES)
    one_of("atrain_kl_type", cfg.atrain_kl_type, KL_TYPES)
    one_of("lr_scheduler_type", cfg.lr_scheduler_type, lr_scheduler_types())
    _check_lr_scheduler(cfg)
    for flag, modes in TRACKER_MODES.items():
        one_of(flag, getattr(cfg, flag), modes)
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


def _validate_step_shape(cfg: TrainConfig) -> None:
    """The sizes of a step: groups, batches, micro-batches, timesteps and image sides."""
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
    _require(
        cfg.prompts_per_step is None or cfg.prompts_per_step >= 1,
        f"--prompts_per_step must be >= 1 (omit it to use --prompts_per_rank), got {cfg.prompts_per_step}",
    )
    if cfg.prompts_per_step is None:
        check_rollout_batch(cfg, cfg.prompts_per_rank, f"--prompts_per_rank {cfg.prompts_per_rank}")
    _require(
        cfg.rollout_micro_batch_size % cfg.rollout_n == 0,
        f"--rollout_micro_batch_size {cfg.rollout_micro_batch_size} must be a multiple of --rollout_n "
        f"{cfg.rollout_n}: each generation pass is scored as soon as it is decoded, and group rewards need "
        "whole groups",
    )


def _validate_numbers(cfg: TrainConfig) -> None:
    """The numeric knobs: rates, coefficients, schedules, patience and retention."""
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
        f"--save_total_limit must be >= 1 (omit it or pass -1 to keep every checkpoint), got {cfg.save_total_limit}",
    )


def _validate_original_options(cfg: TrainConfig) -> None:
    """The simple-mode, evaluation, logging and SFT-aux options of the original DeepGen-RL."""
    _require(
        cfg.eval_inference_mode in EVAL_INFERENCE_MODES,
        f"--eval_inference_mode {cfg.eval_inference_mode!r} is unknown; valid values: "
        f"{', '.join(EVAL_INFERENCE_MODES)}",
    )
    _require(
        cfg.eval_sde_eta is None or (math.isfinite(cfg.eval_sde_eta) and cfg.eval_sde_eta >= 0),
        f"--eval_sde_eta must be a finite number >= 0 (omit it to use --sde_eta), got {cfg.eval_sde_eta}",
    )
    for flag in ("eval_image_height", "eval_image_width"):
        value = getattr(cfg, flag)
        _require(
            value is None or (value > 0 and value % IMAGE_SIDE_MULTIPLE == 0),
            f"--{flag} must be a positive multiple of {IMAGE_SIDE_MULTIPLE} (omit it to use the training size), "
            f"got {value}",
        )
    for flag in ("eval_micro_batch_size", "sftaux_micro_batch_size", "log_component_grad_norm_every",
                 "log_tflops_every"):  # fmt: skip
        value = getattr(cfg, flag)
        _require(value is None or value >= 1, f"--{flag} must be >= 1 (omit it for the default), got {value}")
    _require(
        cfg.eval_num_inference_steps is None or cfg.eval_num_inference_steps >= 1,
        f"--eval_num_inference_steps must be >= 1, got {cfg.eval_num_inference_steps}",
    )
    for flag in ("logging_steps", "sftaux_every_n_steps"):
        value = getattr(cfg, flag)
        _require(value >= 1, f"--{flag} must be >= 1, got {value}")
    for flag in ("eval_wandb_num_upload_images", "eval_swanlab_num_upload_images", "log_images_interval",
                 "log_images_keep", "log_tflops_warmup_steps"):  # fmt: skip
        value = getattr(cfg, flag)
        _require(value >= 0, f"--{flag} must be >= 0, got {value}")
    _require(
        cfg.sftaux_num_workers is None or cfg.sftaux_num_workers >= 0,
        f"--sftaux_num_workers must be >= 0, got {cfg.sftaux_num_workers}",
    )
    _require(
        math.isfinite(cfg.log_tflops_peak) and cfg.log_tflops_peak > 0,
        f"--log_tflops_peak must be the GPU's peak TFLOP/s (> 0), got {cfg.log_tflops_peak}",
    )
    _require(
        cfg.reward_funcs is None or len(cfg.reward_funcs) > 0,
        "--reward_funcs names no reward; pass at least one (e.g. --reward_funcs jpeg_compressibility)",
    )


def _validate_algorithm(cfg: TrainConfig) -> None:
    _require(
        cfg.atrain_algorithm in ALGORITHMS,
        f"--atrain_algorithm {cfg.atrain_algorithm!r} is unknown; valid values: {', '.join(ALGORITHMS)}",
    )
    _require(
        cfg.atrain_nft_rollout in NFT_ROLLOUTS,
        f"--atrain_nft_rollout {cfg.atrain_nft_rollout!r} is unknown; valid values: {', '.join(NFT_ROLLOUTS)}",
    )
    _require(
        cfg.atrain_nft_decay_type in DECAY_SCHEDULES,
        f"--atrain_nft_decay_type {cfg.atrain_nft_decay_type} is unknown; valid values: "
        f"{', '.join(map(str, DECAY_SCHEDULES))}",
    )
    _require(
        cfg.clip_range_high is None or (math.isfinite(cfg.clip_range_high) and cfg.clip_range_high > 0),
        f"--clip_range_high (ATRAIN_GRPOGUARD_HIGHCLIP_RANGE) must be a finite number > 0, got {cfg.clip_range_high}",
    )
    _require(
        math.isfinite(cfg.atrain_nft_beta) and 0 < cfg.atrain_nft_beta <= 1,
        f"--atrain_nft_beta (ATRAIN_NFT_BETA) must be in (0, 1] (the paper uses 0.1-1), got {cfg.atrain_nft_beta}",
    )
    _require(
        math.isfinite(cfg.atrain_nft_adv_clip_range) and cfg.atrain_nft_adv_clip_range > 0,
        f"--atrain_nft_adv_clip_range (ATRAIN_NFT_ADV_CLIP_RANGE) must be a finite number > 0, got "
        f"{cfg.atrain_nft_adv_clip_range}",
    )
    _require(
        cfg.atrain_algorithm != "diffusionnft" or cfg.rollout_n >= 2,
        f"--atrain_algorithm diffusionnft compares images of one prompt (per-prompt mean) and needs --rollout_n >= 2, "
        f"got {cfg.rollout_n}",
    )


def _check_lr_scheduler(cfg: TrainConfig) -> None:
    """The schedule builds with --lr_scheduler_kwargs (a dry run on a one-parameter optimizer)."""
    _require(
        cfg.lr_scheduler_type not in _METRIC_SCHEDULERS,
        f"--lr_scheduler_type {cfg.lr_scheduler_type} steps on a validation metric, which this trainer does not "
        "compute each optimizer step; use constant_with_warmup, cosine, linear, ...",
    )
    try:
        kwargs = json.loads(cfg.lr_scheduler_kwargs) if cfg.lr_scheduler_kwargs else {}
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--lr_scheduler_kwargs is not JSON ({exc}); e.g. '{{\"min_lr_rate\": 0.1}}'") from None
    _require(isinstance(kwargs, dict), "--lr_scheduler_kwargs must be a JSON object, e.g. '{\"min_lr_rate\": 0.1}'")
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        get_scheduler(
            cfg.lr_scheduler_type, optimizer, num_warmup_steps=1, num_training_steps=2, scheduler_specific_kwargs=kwargs
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"--lr_scheduler_type {cfg.lr_scheduler_type} cannot be built with --lr_scheduler_kwargs "
            f"{cfg.lr_scheduler_kwargs or '{}'}: {exc}; pass what it needs as JSON, e.g. "
            "--lr_scheduler_kwargs '{\"min_lr_rate\": 0.1}' (cosine_with_min_lr) or '{\"num_decay_steps\": 100}' "
            "(warmup_stable_decay)"
        ) from None
