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
import copy
import dataclasses
import json
import logging
import math
import os
import textwrap
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from deepgen_common.client.urls import parse_service_url
from deepgen_trainer.algorithms.advantages import ADVANTAGE_TYPES, GROUP_NORMALISING_TYPES, AdvantageType
from deepgen_trainer.algorithms.diffusion_nft import DECAY_SCHEDULES
from deepgen_trainer.algorithms.policy_loss import KL_TYPES, KLType
from deepgen_trainer.algorithms.sde import LOGPROB_MIN_STD, SAMPLERS, Sampler
from deepgen_trainer.original import flags as original_flags
from deepgen_trainer.original import urls as original_urls

ModelKind = Literal["hf", "tiny"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
EvalInferenceMode = Literal["ode", "sde"]
EVAL_INFERENCE_MODES: tuple[str, ...] = get_args(EvalInferenceMode)
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
        "MODEL_CONFIG",
        "WANDB_MODE",
        "SWANLAB_MODE",
        "WANDB_PROJECT",
    )
}
# Service URLs: `host:port` means http://host:port, as the original accepted (`deepgen_trainer.original.urls`).
URL_FIELDS: tuple[str, ...] = ("ocr_url", "unifiedreward_think_url", "unigenbench_api_url")
# Deployment facts several variables of the seed can set: the first one set wins.
ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "swanlab_project": ("SWANLAB_PROJECT", "SWANLAB_PROJ_NAME"),
    "run_name": ("WANDB_RUN_NAME", "WANDB_NAME", "RUN_NAME", "SWANLAB_EXP_NAME"),
}
TRACKER_MODES: dict[str, tuple[str, ...]] = {
    "wandb_mode": ("online", "offline", "disabled"),
    "swanlab_mode": ("online", "offline", "local", "disabled"),
}


# --atrain_algorithm: the update rule (DESIGN §4 "The original's other algorithms").
Algorithm = Literal["flowgrpo", "grpoguard", "diffusionnft"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
NftRollout = Literal["ode", "sde"]
NFT_ROLLOUTS: tuple[str, ...] = get_args(NftRollout)
# The original trainer's environment knobs of its algorithms, and the flag each one is the default of
# (a flag given on the command line wins; `parse_args` logs where each value came from).
ALGORITHM_ENV_FIELDS: dict[str, str] = {
    "ATRAIN_NFT_BETA": "atrain_nft_beta",
    "ATRAIN_NFT_ADV_CLIP_RANGE": "atrain_nft_adv_clip_range",
    "ATRAIN_ADV_CLIP_MAX": "adv_clip",
    "ATRAIN_GRPOGUARD_HIGHCLIP_RANGE": "clip_range_high",
}
# The original's switches for GRPO-Guard variants that have no meaning here: one notice each when set.
ALGORITHM_ENV_NOTICES: dict[str, str] = {
    "ATRAIN_GRPOGUARD_PAPER_IMPL": "GRPO-Guard always applies RatioNorm and the 1/(−dt) gradient weight (the paper's "
    "method, the original's ATRAIN_GRPOGUARD_PAPER_IMPL=1 path)",
    "ATRAIN_CLAMP_LOGPROB_DIFF": "the log-ratio is not clamped: old log-probs are kept in float32, so it stays finite",
    "ATRAIN_CLAMP_LOGPROB": "log-probs are not clamped: old log-probs are kept in float32, so they stay finite",
}
log = logging.getLogger("deepgen_trainer")


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
    # The update rule (flowgrpo: the clipped ratio above) and its algorithms' knobs.
    atrain_algorithm: Algorithm = field(default="flowgrpo", metadata=_help(f"one of {', '.join(ALGORITHMS)}"))
    clip_range_high: float | None = field(
        default=None,
        metadata=_help(
            "upper clip 1 + c_high of the ratio (default: --clip_range) [env ATRAIN_GRPOGUARD_HIGHCLIP_RANGE]"
        ),
    )
    atrain_nft_beta: float = field(
        default=0.1, metadata=_help("diffusionnft: β of the implicit policies, in (0, 1] [env ATRAIN_NFT_BETA]")
    )
    atrain_nft_adv_clip_range: float = field(
        default=5.0, metadata=_help("diffusionnft: r = ½ + ½·clip(A/a, ±1), a > 0 [env ATRAIN_NFT_ADV_CLIP_RANGE]")
    )
    atrain_nft_off_policy: bool = field(
        default=False,
        metadata=_help("diffusionnft: roll out with a soft-updated copy of the DiT (v_old); off: the current DiT"),
    )
    atrain_nft_decay_type: int = field(
        default=1,
        metadata=_help("diffusionnft off-policy decay schedule: 1: min(0.001·step, 0.5); 2: 0 for 75 steps, then up"),
    )
    atrain_nft_rollout: NftRollout = field(
        default="ode", metadata=_help("diffusionnft rollout: ode (Euler), or sde (--atrain_sde_sampler, --sde_eta)")
    )
    # Optimisation.
    learning_rate: float = 2e-6
    lr_scheduler_type: str = field(
        default="constant_with_warmup", metadata=_help("any name of transformers' get_scheduler (SchedulerType)")
    )
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
    save_total_limit: int | None = field(default=None, metadata=_help("checkpoints kept; -1 or 0: all (default: all)"))
    eval_freq: int = field(default=10, metadata=_help("evaluate every N steps (0: never)"))
    eval_before_train: bool = False
    eval_cfg_scale: float = 4.0
    report_to: tuple[str, ...] = field(
        default=DEFAULT_REPORT_TO, metadata=_help("comma-separated trackers among wandb,swanlab, or none")
    )
    # Coming from DeepGen-RL: its model config, scheduler options and tracker settings.
    model_config: str | None = field(
        default=None, metadata=_help("the original's MMEngine model config (.py): checked against the model built")
    )
    lr_scheduler_kwargs: str | None = field(
        default=None, metadata=_help("JSON of extra get_scheduler arguments, e.g. '{\"min_lr_rate\": 0.1}'")
    )
    run_name: str | None = field(
        default=None, metadata=_help("run name in wandb / swanlab [env WANDB_RUN_NAME, WANDB_NAME, RUN_NAME, "
                                     "SWANLAB_EXP_NAME]")
    )  # fmt: skip
    wandb_mode: str = field(default="offline", metadata=_help(f"one of {', '.join(TRACKER_MODES['wandb_mode'])}"))
    swanlab_mode: str = field(
        default="offline", metadata=_help(f"one of {', '.join(TRACKER_MODES['swanlab_mode'])} (disabled: no files)")
    )
    wandb_project: str = field(default="deepgen-rl", metadata=_help("wandb project"))
    swanlab_project: str = field(
        default="deepgen-rl", metadata=_help("swanlab project [env SWANLAB_PROJECT, SWANLAB_PROJ_NAME]")
    )
    # The original DeepGen-RL's simple mode, evaluation, logging and SFT-aux options (its meaning; see
    # trainer/README.md). None = the flag or value the help names.
    reward_funcs: tuple[str, ...] | None = field(
        default=None,
        metadata=_help("simple mode (no --dataset_config): the rewards of every prompt of --prompts_file, weight 1 "
                       "each (default: jpeg_compressibility)"),
    )  # fmt: skip
    prompts_file: str | None = field(
        default=None, metadata=_help("simple mode: a .txt / .jsonl / .csv / .parquet prompt file (no --dataset_config)")
    )
    eval_inference_mode: EvalInferenceMode = field(
        default="ode", metadata=_help("ode: deterministic Euler; sde: the training sampler with --eval_sde_eta")
    )
    eval_sde_eta: float | None = field(
        default=None, metadata=_help("η of --eval_inference_mode sde (default: --sde_eta)")
    )
    eval_image_height: int | None = field(
        default=None, metadata=_help("evaluation image height (default: --image_height)")
    )
    eval_image_width: int | None = field(
        default=None, metadata=_help("evaluation image width (default: --image_width)")
    )
    eval_micro_batch_size: int | None = field(
        default=None, metadata=_help("images per GPU per evaluation pass (default: --rollout_micro_batch_size)")
    )
    eval_num_inference_steps: int | None = field(
        default=None,
        metadata=_help("evaluation steps; the eval YAML's num_inference_steps wins (default: --num_inference_steps)"),
    )
    eval_wandb_num_upload_images: int = field(
        default=0, metadata=_help("evaluation images uploaded to wandb per set (the contact sheet is uploaded as well)")
    )
    eval_swanlab_num_upload_images: int = field(
        default=32,
        metadata=_help("evaluation images uploaded to swanlab per set (the contact sheet is uploaded as well)"),
    )
    log_images_interval: int = field(
        default=1,
        metadata=_help("every N steps rank 0 writes its first group's images (JPEG, advantage in the name) and "
                       "prompt to <output_dir>/training_samples/step_<N>/ (0: never); only the newest "
                       "--log_images_keep steps stay"),
    )  # fmt: skip
    log_images_keep: int = field(default=20, metadata=_help("training_samples/ keeps this many steps (0: all)"))
    logging_steps: int = field(
        default=1, metadata=_help("send the step metrics to the trackers every N steps, averaged over those steps")
    )
    log_component_grad_norm: bool = field(
        default=False,
        metadata=_help("log grad_norm/{policy,beta_kl,sftaux}: the norms of each part's gradient summed over the "
                       "backward passes and averaged over ranks (the update and the DeepSpeed micro-steps are "
                       "unchanged; on measured steps each policy pass's backward carries the policy and β·KL pieces "
                       "apart, about twice its backward compute, and each part keeps a float32 gradient-sized sum; "
                       "no effect under ZeRO-3)"),
    )  # fmt: skip
    log_component_grad_norm_every: int | None = field(
        default=None, metadata=_help("measure the component norms every N steps (default: --logging_steps)")
    )
    log_tflops: bool = field(
        default=False,
        metadata=_help(
            "log perf/tflops (achieved TFLOP/s per GPU, analytic FLOP count over the step time) and perf/mfu"
        ),
    )
    log_tflops_every: int | None = field(default=None, metadata=_help("every N steps (default: --logging_steps)"))
    log_tflops_warmup_steps: int = field(default=5, metadata=_help("no TFLOP/s for the first N steps of a run"))
    log_tflops_peak: float = field(default=989.0, metadata=_help("peak TFLOP/s per GPU for perf/mfu (H100 bf16 dense)"))
    sftaux_every_n_steps: int = field(default=1, metadata=_help("the SFT auxiliary loss every N steps"))
    sftaux_micro_batch_size: int | None = field(
        default=None, metadata=_help("SFT-aux images per GPU per step (default: --atrain_micro_batch_size)")
    )
    sftaux_num_workers: int | None = field(
        default=None,
        metadata=_help("threads decoding SFT-aux images (default: the MMEngine config's num_workers, else 0)"),
    )
    sftaux_disable_on_error: bool = field(
        default=False, metadata=_help("train without SFT-aux, with a warning, when its data cannot be loaded")
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
    def advantage_type(self) -> AdvantageType:
        """The advantages the update uses: DiffusionNFT's r comes from the per-prompt mean and a global
        std (``grpo_global_std``), the others use ``--atrain_adv_type``."""
        return "grpo_global_std" if self.atrain_algorithm == "diffusionnft" else self.atrain_adv_type

    @property
    def scores_exact_logprob(self) -> bool:
        """cps_sde transitions are scored with the exact Gaussian log-density: ``--exact_logprob``, or
        GRPO-Guard, whose RatioNorm is only right for the exact density."""
        return self.exact_logprob or self.atrain_algorithm == "grpoguard"

    @property
    def rollout_eta(self) -> float:
        """η of the rollout: 0 (the ODE) for DiffusionNFT's default ``--atrain_nft_rollout ode``."""
        return 0.0 if self.atrain_algorithm == "diffusionnft" and self.atrain_nft_rollout == "ode" else self.sde_eta

    @property
    def shared_initial_noise(self) -> bool:
        """A group shares one initial noise (``--init_same_noise``), except under DiffusionNFT: its
        images must differ for r to carry a signal (one noise through an ODE gives identical images)."""
        return self.init_same_noise and self.atrain_algorithm != "diffusionnft"

    def algorithm_notices(self) -> list[str]:
        """One line per flag that would ask for one of the original's defects under the chosen
        algorithm, saying what is done instead (logged once at start)."""
        notes = []
        if self.atrain_algorithm == "diffusionnft":
            if self.atrain_adv_type != "grpo_global_std":
                notes.append(
                    f"diffusionnft: r uses the per-prompt mean and a global std (grpo_global_std), as the paper; "
                    f"--atrain_adv_type {self.atrain_adv_type} is not used"
                )
            if self.init_same_noise:
                notes.append(
                    "diffusionnft: one initial noise per image (--init_same_noise would give a group identical "
                    "images under the ODE rollout, hence r = 1/2 and no signal)"
                )
            if self.atrain_kl_type != "v-based" and self.beta > 0:
                notes.append(
                    f"diffusionnft: the KL is mean((v_θ − v_ref)²) on velocities, without a variance divisor; "
                    f"--atrain_kl_type {self.atrain_kl_type} is not used"
                )
        if self.atrain_algorithm == "grpoguard" and self.atrain_sde_sampler == "cps_sde" and not self.exact_logprob:
            notes.append("grpoguard: cps_sde is scored with its exact Gaussian log-density (RatioNorm needs it)")
        return notes

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
        if self.reward_funcs is not None:
            values["reward_funcs"] = list(self.reward_funcs)
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
        if values.get("reward_funcs") is not None:
            values["reward_funcs"] = tuple(values["reward_funcs"])
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
        f"--save_total_limit must be >= 1 (omit it or pass -1 to keep every checkpoint), got {cfg.save_total_limit}",
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

    _validate_algorithm(cfg)
    deepspeed_config_path(cfg.deepspeed)
    _validate_original_options(cfg)


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


# ---------------------------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # Raise instead of exiting so that callers (and tests) see one exception type for bad flags.
        raise ConfigError(f"{message}; see --help for the valid flags")


def shown_default(value: Any) -> str:
    """A default as it would be typed on the command line: lists comma-separated (``none`` when empty),
    None as ``unset``."""
    if value is None:
        return "unset"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Names every option's default in --help, also for options without a help text and options added
    later, unless the help already names it (``(default: all)``, argparse's ``%(default)s``)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.option_strings and not (action.help or "").strip():
            action = copy.copy(action)  # argparse prints no help line for an empty help
            action.help = self._get_help_string(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        names_it = "(default" in help_text or "%(default)" in help_text
        if not action.option_strings or action.default is argparse.SUPPRESS or names_it:
            return help_text
        shown = shown_default(action.default).replace("%", "%%")  # the help is %-formatted afterwards
        return f"{help_text} (default: {shown})".strip()

    def _split_lines(self, text: str, width: int) -> list[str]:
        # As argparse's, but never breaking a hyphenated value (deepgen-rl) across lines.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def deployment_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Field values of the deployment facts set in the environment (the only environment read)."""
    environ = os.environ if environ is None else environ
    values = {name: environ[var] for var, name in ENV_FIELDS.items() if environ.get(var)}
    values |= {ENV_FIELDS[var]: url for var, url in original_urls.unset_url_defaults(environ).items()}
    values |= {name: original_urls.with_scheme(values[name]) for name in URL_FIELDS if values.get(name)}
    for name, variables in ENV_ALIASES.items():
        first = next((environ[v] for v in variables if environ.get(v)), None)
        if first is not None:
            values[name] = first
    return values


def algorithm_env(environ: Mapping[str, str] | None = None) -> dict[str, float]:
    """Flag defaults from the original's algorithm knobs (``ATRAIN_NFT_BETA``, ...) set in the
    environment, and a notice for each of its switches that have no meaning here."""
    environ = os.environ if environ is None else environ
    values = {}
    for var, name in ALGORITHM_ENV_FIELDS.items():
        if environ.get(var):
            try:
                values[name] = float(environ[var])
            except ValueError:
                raise ConfigError(f"{var}={environ[var]!r} is not a number (it is the default of --{name})") from None
    for var, note in ALGORITHM_ENV_NOTICES.items():
        if environ.get(var):
            log.info("%s=%s has no effect: %s", var, environ[var], note)
    return values


class _RecordGiven(argparse.Action):
    """Stores the value and remembers that the flag was on the command line (to log its source)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.__dict__.setdefault("_given", set()).add(self.dest)


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """One ``--flag`` per `TrainConfig` field; env-backed flags default to their environment variable."""
    parser = _Parser(
        prog="deepgen_trainer", description="MR-GRPO training of DeepGen 1.0.", formatter_class=DefaultsHelpFormatter
    )
    env = deployment_env(environ) | algorithm_env(environ)
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        default = env.get(f.name, f.default)
        help_text = f.metadata.get("help", "")
        if f.name in ENV_FIELDS.values():
            help_text += f" [env {f.name.upper()}]"
        if f.name == "save_total_limit":
            parser.add_argument(f"--{f.name}", type=_keep_limit, default=default, help=help_text)  # -1 or 0: all
            continue
        kind = _scalar_type(hints[f.name])
        if kind is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif f.name == "report_to":
            parser.add_argument(f"--{f.name}", type=_report_to, default=default, help=help_text)
        elif f.name == "reward_funcs":  # the original's nargs="+"; commas also separate
            parser.add_argument(f"--{f.name}", nargs="+", default=default, help=help_text)
        elif f.name in ALGORITHM_ENV_FIELDS.values():
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=help_text, action=_RecordGiven)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=help_text)
    original_flags.add_original_flags(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Flags > environment (deployment facts only) > defaults, validated. Raises `ConfigError`.
    The original DeepGen-RL's flags are translated (`deepgen_trainer.original.flags`), each with one
    INFO line."""
    namespace = build_parser(environ).parse_args(argv)
    if namespace.reward_funcs is not None:
        namespace.reward_funcs = tuple(
            n.strip() for part in namespace.reward_funcs for n in part.split(",") if n.strip()
        )
    given_algorithm = namespace.__dict__.pop("_given", set())
    given = original_flags.pop_original_flags(namespace)
    values = vars(namespace)
    values |= {name: original_urls.with_scheme(values[name]) for name in URL_FIELDS if values[name]}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    try:
        overrides, notices = original_flags.translate(given, values, defaults)
    except original_flags.OriginalFlagError as exc:
        raise ConfigError(str(exc)) from None
    values["report_to"], report_notices = original_flags.translate_report_to(values["report_to"])
    if (os.environ if environ is None else environ).get("RANK", "0") == "0":  # one line per run, not per rank
        for notice in [*notices, *report_notices]:
            logging.getLogger(__name__).info("%s", notice)
    cfg = TrainConfig(**{**values, **overrides})
    _log_algorithm_sources(cfg, given_algorithm, os.environ if environ is None else environ)
    return cfg


def lr_scheduler_types() -> tuple[str, ...]:
    """Every scheduler name transformers' `get_scheduler` takes (imported on first use: transformers is slow
    to import)."""
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


# Schedulers that step on a validation metric, which this trainer does not compute per optimizer step.
_METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")


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


def _keep_limit(value: str) -> int | None:
    """``--save_total_limit``: -1 (the original's default) or 0 keeps every checkpoint, as in HF's Trainer."""
    limit = int(value)
    return None if limit <= 0 else limit


def _log_algorithm_sources(cfg: TrainConfig, given: set[str], environ: Mapping[str, str]) -> None:
    """One line: each algorithm knob's value and where it came from (command line, environment, default)."""
    parts = []
    for var, name in ALGORITHM_ENV_FIELDS.items():
        if name in given:
            source = "command line" + (f", over {var}={environ[var]}" if environ.get(var) else "")
        elif environ.get(var):
            source = f"env {var}"
        else:
            source = "default"
        parts.append(f"--{name} {getattr(cfg, name)} ({source})")
    log.info("algorithm %s: %s", cfg.atrain_algorithm, ", ".join(parts))
    if cfg.atrain_nft_off_policy and cfg.atrain_algorithm != "diffusionnft":
        log.info("--atrain_nft_off_policy has no effect with --atrain_algorithm %s (it is DiffusionNFT's)",
                 cfg.atrain_algorithm)  # fmt: skip


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
