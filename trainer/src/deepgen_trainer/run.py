"""What a training run is made of, built once before the loop: model, frozen reference, data,
rewards, optimizer, trackers and evaluation client, resumed from the newest complete checkpoint."""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepgen_common.client import EvalClient
from deepgen_trainer.checkpoint import apply_rng, latest_checkpoint, load_checkpoint
from deepgen_trainer.clip_reward import ClipSimReward, build_tiny_clip
from deepgen_trainer.config import ConfigError, TrainConfig
from deepgen_trainer.data import TrainData, load_eval_data, load_train_data
from deepgen_trainer.distributed import World
from deepgen_trainer.loading import load_deepgen
from deepgen_trainer.model import NEGATIVE_PROMPT, Conditioning, DeepGen
from deepgen_trainer.optim import Updater, build_updater
from deepgen_trainer.reward_outage import wait_for_reward_services
from deepgen_trainer.rewards import REWARD_NAMES, REWARD_URL_ENV, RewardFn, RewardScorer, build_reward
from deepgen_trainer.sampler import PromptSampler
from deepgen_trainer.sftaux_data import SftAuxLoader, load_sftaux_data
from deepgen_trainer.tiny import build_tiny
from deepgen_trainer.tracking import Tracker

log = logging.getLogger("deepgen_trainer")


@dataclass
class Run:
    """Everything `setup` builds for the loop."""

    cfg: TrainConfig
    world: World
    model: DeepGen
    reference: torch.nn.Module | None
    data: TrainData
    reward_names: tuple[str, ...]
    sampler: PromptSampler
    sftaux: SftAuxLoader | None
    scorer: RewardScorer
    updater: Updater
    tracker: Tracker
    eval_client: EvalClient | None
    eval_plans: list[tuple[str, float, int]]  # (name, cfg_scale, num_inference_steps) per evaluation
    start_step: int
    total_steps: int
    uncond: Conditioning | None


def setup(cfg: TrainConfig, world: World) -> Run:
    """Build the model, data, rewards, optimizer and trackers; resume from the newest checkpoint."""
    if cfg.dataset_config is None:
        raise ConfigError("no training prompts: pass --dataset_config (or set DATASET_CONFIG) to a train YAML")
    _seed_everything(cfg.seed + world.rank)
    data = load_train_data(cfg.dataset_config, REWARD_NAMES)
    reward_names = data.reward_names
    model = build_model(cfg).to(world.device)
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    reference = None
    if cfg.beta > 0:  # the KL reference: a frozen copy of the initial DiT
        reference = copy.deepcopy(model.transformer).requires_grad_(False).eval()
    remote = {name: reward_url(cfg, name) for name in reward_names if name in REWARD_URL_ENV}
    wait_for_reward_services({n: u for n, u in remote.items() if u}, cfg.reward_ready_timeout)
    scorer = RewardScorer({name: _reward(name, cfg, world) for name in reward_names})
    sampler = PromptSampler(data, cfg.prompts_per_rank_for(world.world_size), cfg.seed, world.rank, world.world_size)
    sftaux = None
    if cfg.uses_sftaux:
        sftaux = SftAuxLoader(load_sftaux_data(cfg.sftaux_dataset_config), cfg.seed, world.rank)
    epochs_steps = math.ceil(cfg.num_train_epochs * sampler.batches_per_epoch)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else epochs_steps
    updater = build_updater(model.transformer, cfg, world, total_steps)

    start_step = 0
    resume = latest_checkpoint(cfg.output_dir)
    if resume is not None:
        ckpt = load_checkpoint(resume, map_location=world.device, rank=world.rank)
        updater.restore(ckpt)
        if ckpt.sampler_state is not None:
            sampler.load_state_dict(ckpt.sampler_state["prompts"])
            if sftaux is not None:
                sftaux.load_state_dict(ckpt.sampler_state["sftaux"])
        if ckpt.rng is not None:
            apply_rng(ckpt.rng)
        start_step = ckpt.step
        log.info("resumed from %s at step %d", resume, start_step)

    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if world.is_main:
        (Path(cfg.output_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tracker = Tracker(
        cfg.report_to, output_dir=cfg.output_dir, config=cfg.to_dict(), prometheus_port=cfg.metrics_port,
        rank=world.rank,
    )  # fmt: skip
    eval_client = None
    if cfg.unigenbench_api_url and (cfg.eval_freq or cfg.eval_before_train):
        eval_client = EvalClient(cfg.unigenbench_api_url)
    # The eval service owns the prompts and duplicates; the eval YAML sets how each evaluation samples.
    eval_plans = [("unigenbench", cfg.eval_cfg_scale, cfg.num_inference_steps)]
    if cfg.eval_dataset_config:
        datasets = load_eval_data(cfg.eval_dataset_config).datasets
        eval_plans = [(d.name, d.cfg_scale, d.num_inference_steps) for d in datasets]
    uncond = model.encode_prompts([NEGATIVE_PROMPT]) if cfg.cfg_scale > 0 else None
    log.info(
        "training %d steps from step %d: %d prompts × %d images per rank, %d ranks, rewards %s, DiT %.3g M parameters",
        total_steps, start_step, cfg.prompts_per_rank_for(world.world_size), cfg.rollout_n, world.world_size,
        ", ".join(reward_names), sum(p.numel() for p in model.trainable_parameters()) / 1e6,
    )  # fmt: skip
    return Run(
        cfg, world, model, reference, data, reward_names, sampler, sftaux, scorer, updater, tracker, eval_client,
        eval_plans, start_step, total_steps, uncond,
    )  # fmt: skip


def build_model(cfg: TrainConfig) -> DeepGen:
    if cfg.model == "tiny":
        return build_tiny(seed=cfg.seed)
    if not cfg.sd3_5_model_name_or_path or not cfg.qwen2_5_vl_model_name_or_path:
        raise ConfigError(
            "--model hf needs SD3_5_MODEL_NAME_OR_PATH and QWEN2_5_VL_MODEL_NAME_OR_PATH (flags or env); "
            "or pass --model tiny for a random tiny model"
        )
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model, report = load_deepgen(
        cfg.sd3_5_model_name_or_path, cfg.qwen2_5_vl_model_name_or_path, cfg.checkpoint, dtype=dtype
    )
    log.info("model loaded: %s", report.summary())
    return model


def reward_url(cfg: TrainConfig, name: str) -> str | None:
    """The service URL of a remote reward (``OCR_URL`` / ``UNIFIEDREWARD_THINK_URL``)."""
    return {"ocr": cfg.ocr_url, "unifiedreward_think": cfg.unifiedreward_think_url}[name]


def _reward(name: str, cfg: TrainConfig, world: World) -> RewardFn:
    if name == "clip_sim":
        if cfg.clip_model_name_or_path:
            clip = ClipSimReward.from_pretrained(cfg.clip_model_name_or_path, device=world.device)
        elif cfg.model == "tiny":
            clip = build_tiny_clip(seed=cfg.seed, device=world.device)
        else:
            raise ConfigError("reward clip_sim needs CLIP_MODEL_NAME_OR_PATH (or --clip_model_name_or_path)")
        return build_reward(name, clip=clip)
    url = reward_url(cfg, name)
    try:
        return build_reward(name, url=url)
    except ValueError as exc:  # a missing URL
        raise ConfigError(str(exc)) from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
