"""`TrainConfig`: the trainer's flags as one typed, frozen dataclass, and the values derived from them
(per-rank batches, backward passes and optimizer steps per rollout, the algorithm's effective switches).

Every field is a ``--flag`` of the same name (`deepgen_trainer.config.command_line`), its ``help``
metadata the flag's help. Building one validates it (`deepgen_trainer.config.validation`), so a config
from the command line, from a saved run (`TrainConfig.from_dict`) or built in code is checked the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deepgen_trainer.algorithms.advantages import ADVANTAGE_TYPES, AdvantageType
from deepgen_trainer.algorithms.policy_loss import KL_TYPES, KLType
from deepgen_trainer.algorithms.sde import LOGPROB_MIN_STD, SAMPLERS, Sampler
from deepgen_trainer.config.choices import (
    ALGORITHMS,
    DEEPSPEED_CONFIG_NAMES,
    DEFAULT_REPORT_TO,
    TRACKER_MODES,
    Algorithm,
    EvalInferenceMode,
    ModelKind,
    NftRollout,
    tracker_names,
)
from deepgen_trainer.config.errors import ConfigError
from deepgen_trainer.config.validation import check_rollout_batch, validate


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
        validate(self)

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
        check_rollout_batch(self, per_rank, f"--prompts_per_step {self.prompts_per_step} over {world_size} ranks")
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

    def due(self, every: int | None, step: int) -> bool:
        """A logging option with cadence `every` acts at `step`; None: every ``--logging_steps`` steps, the
        original's default for its logging options."""
        return step % (every if every is not None else self.logging_steps) == 0

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
            values["report_to"] = tracker_names(values["report_to"])
        if values.get("reward_funcs") is not None:
            values["reward_funcs"] = tuple(values["reward_funcs"])
        return cls(**values)
