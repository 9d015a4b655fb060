"""The training loop (`train`) and the command (`main`): each step's phases in order, the pipeline of
`--one_step_off_policy`, evaluation, checkpoints and the stop on a reward outage."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from deepgen_trainer.algorithms.advantages import compute_advantages
from deepgen_trainer.config import ConfigError, TrainConfig, parse_args
from deepgen_trainer.data.prompts import DataConfigError
from deepgen_trainer.engine.distributed import World, close_world, init_world
from deepgen_trainer.model.deepgen import DeepGen
from deepgen_trainer.observe.training_samples import save_training_samples
from deepgen_trainer.rewards.outage import FailureWatch, RewardOutage
from deepgen_trainer.rewards.scorer import RewardBatch
from deepgen_trainer.run import Run, reward_url, setup
from deepgen_trainer.train.bookkeeping import (
    StepTimes,
    check_ranks_agree,
    checkpoint,
    log_step,
    run_eval,
    step_metrics,
    step_tflops,
)
from deepgen_trainer.train.rollout import Rollout, generate
from deepgen_trainer.train.update import update_policy

log = logging.getLogger("deepgen_trainer")


def train(cfg: TrainConfig, world: World | None = None, model: DeepGen | None = None) -> DeepGen:
    """Run MR-GRPO training to `total_steps`; returns the trained model. `model`: one built by the caller
    instead of `--model`'s (see `run.setup`)."""
    world = world or init_world()
    run = setup(cfg, world, model)
    watch = FailureWatch(run.reward_names, cfg.reward_failure_patience)
    progress = tqdm(total=run.total_steps, initial=run.start_step, desc="train", disable=not world.is_main)
    ahead: Rollout | None = None  # --one_step_off_policy: the next step's rollout, generated one update ago
    try:
        if cfg.eval_before_train and run.start_step == 0:
            log_step(run, 0, run_eval(run, 0))
        for step in range(run.start_step + 1, run.total_steps + 1):
            t_step = time.perf_counter()

            # 1. rollout; rewards of each micro-batch are requested as soon as it is decoded. With
            # --one_step_off_policy this step's rollout was generated during the previous step, and the
            # next one is generated now, while this one is scored (never across a checkpoint: the
            # pipeline drains at save steps, so a resumed run regenerates the next batch exactly).
            rollout = ahead if ahead is not None else generate(run, step)
            generated = [] if ahead is not None else [rollout]  # the rollouts generated during this step
            ahead = None
            if cfg.one_step_off_policy and step < run.total_steps and not _saves(run, step):
                ahead = generate(run, step + 1)
                generated.append(ahead)

            # 2. rewards, 3. advantages
            rewards: RewardBatch = run.scorer.gather(rollout.pending)
            advantages = step_advantages(run, rollout, rewards)
            if cfg.log_images_interval and step % cfg.log_images_interval == 0 and world.is_main:
                assert rollout.first_group is not None
                save_training_samples(
                    Path(cfg.output_dir), step, rollout.first_group, rollout.prompts[0],
                    advantages[: cfg.rollout_n].tolist(), cfg.log_images_keep,
                )  # fmt: skip

            # 4.-6. policy update (+ SFT auxiliary loss), --optimizer_steps_per_rollout optimizer steps
            t0 = time.perf_counter()
            lag = run.updater.optimizer_steps - rollout.policy_version
            stats, grad_norm = update_policy(run, rollout, advantages, step)
            times = StepTimes(
                rollout=sum(r.seconds for r in generated), local_rewards=sum(r.local_reward_seconds for r in generated),
                update=time.perf_counter() - t0, step=time.perf_counter() - t_step,
            )  # fmt: skip

            # 7. evaluate, log, checkpoint
            metrics = step_metrics(run, rollout, rewards, advantages, stats, grad_norm, lag, times)
            warm = step - run.start_step > cfg.log_tflops_warmup_steps
            if run.shape is not None and warm and cfg.due(cfg.log_tflops_every, step):
                metrics |= step_tflops(run, rollout, "sft/loss" in metrics, times.step)
            if run.eval_plans and cfg.eval_freq and step % cfg.eval_freq == 0:
                t0 = time.perf_counter()
                metrics |= run_eval(run, step)
                metrics["time/eval"] = time.perf_counter() - t0
            log_step(run, step, metrics)  # before the checkpoint: a resumed run never misses a step's metrics
            failing = watch.update(_all_ranks(world, rewards.status))  # every rank takes the same decision
            if failing is not None:
                if ahead is not None:  # the next batch is dropped: resume draws its prompts again
                    run.sampler.load_state_dict(ahead.sampler_state)
                path = checkpoint(run, step)
                url = reward_url(cfg, failing)
                raise RewardOutage(watch.message(failing, url, run.scorer.last_errors.get(failing), str(path)))
            if _saves(run, step):
                checkpoint(run, step)
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward/total']:.3f}", loss=f"{metrics.get('policy/loss', 0):.2e}")
        check_ranks_agree(run.updater, world)
    finally:
        progress.close()
        run.scorer.close()
        run.tracker.close()
        if run.sftaux is not None:
            run.sftaux.close()
        if run.eval_client is not None:
            run.eval_client.close()
    return run.model


def step_advantages(run: Run, rollout: Rollout, rewards: RewardBatch) -> torch.Tensor:
    """The (N,) advantages of the rollout's images on the training device: `--atrain_adv_type` over the
    weighted rewards, with the group statistics over all ranks where the algorithm asks for them."""
    cfg, world = run.cfg, run.world
    global_stats = cfg.global_adv_stats or cfg.atrain_algorithm == "diffusionnft"  # NFT: a global std
    return compute_advantages(
        cfg.advantage_type, rewards.rewards, rollout.weights, cfg.rollout_n, eps=cfg.adv_eps,
        clip=cfg.adv_clip, all_gather=world.all_gather_cat if global_stats else None,
    ).to(world.device)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """The command: train with the flags `argv`; exit 2 on a bad configuration, 3 on a reward outage."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    world = init_world()
    try:
        train(cfg, world)
    except (ConfigError, DataConfigError) as exc:
        log.error("%s", exc)
        return 2
    except RewardOutage as exc:
        log.error("%s", exc)
        return 3
    finally:
        close_world(world)
    return 0


def _all_ranks(world: World, status: torch.Tensor) -> torch.Tensor:
    """The (N, K) reward status codes of every rank, concatenated (this rank's alone when not distributed)."""
    if not world.distributed:
        return status
    return world.all_gather_cat(status.to(world.device, torch.float32)).to("cpu", torch.int8)


def _saves(run: Run, step: int) -> bool:
    """A checkpoint is written after this step."""
    return step % run.cfg.save_steps == 0 or step == run.total_steps
