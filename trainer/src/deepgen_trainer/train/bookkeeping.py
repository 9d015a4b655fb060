"""Step 7, what a step leaves behind: its metrics (the log line, the trackers, `metrics.jsonl`), the
evaluations of the eval YAML, checkpoints, and the end-of-run check that every rank holds the same DiT."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from deepgen_trainer.algorithms.advantages import clamp_fraction, weighted_reward_sum
from deepgen_trainer.checkpoints.ema import ema_dit
from deepgen_trainer.checkpoints.run_checkpoint import prune_checkpoints, save_checkpoint
from deepgen_trainer.engine.distributed import World
from deepgen_trainer.engine.optim import Updater
from deepgen_trainer.evaluation.evaluate import EvalSampling, evaluate
from deepgen_trainer.observe.flops import StepShape, model_flops, step_flops, utilisation
from deepgen_trainer.rewards.scorer import RewardBatch, reward_metrics
from deepgen_trainer.run import Run
from deepgen_trainer.train.rollout import Rollout
from deepgen_trainer.train.update import PassStats

log = logging.getLogger("deepgen_trainer")


@dataclass(frozen=True)
class StepTimes:
    """Seconds of one step's phases on this rank."""

    rollout: float  # generation and decoding, the in-process rewards included
    local_rewards: float  # the in-process rewards (clip_sim), scored as each micro-batch is decoded
    update: float
    step: float


def step_metrics(
    run: Run,
    rollout: Rollout,
    rewards: RewardBatch,
    advantages: torch.Tensor,
    stats: PassStats,
    grad_norm: float,
    lag: int,
    times: StepTimes,
) -> dict[str, float]:
    """This rank's metrics of one step: rewards, advantages, the update's pass means, timings, throughput
    and the optimizer's state. `lag`: optimizer steps between the rollout's policy and the update's."""
    cfg, world, updater = run.cfg, run.world, run.updater
    n_images = len(rollout.prompts)
    return {
        **reward_metrics(run.reward_names, rewards.rewards, rewards.status),
        "reward/total": _nanmean(weighted_reward_sum(rewards.rewards, rollout.weights)),
        "adv/mean": advantages.mean().item(),
        "adv/std": advantages.std().item() if len(advantages) > 1 else 0.0,
        "adv/clamp_frac": clamp_fraction(advantages, cfg.adv_clip).item(),
        **stats.means(),
        "policy/lag": float(lag),
        "time/rollout": times.rollout - times.local_rewards,
        "time/clip_sim": times.local_rewards,
        "time/reward": rewards.wait_s,
        "time/update": times.update,
        "time/step": times.step,
        "perf/images_per_sec_per_gpu": n_images / times.step,
        "perf/images_per_sec": n_images * world.world_size / times.step,
        "lr": updater.lr,
        "grad_norm": grad_norm,
        "optim/steps": float(updater.optimizer_steps),
    }


def step_tflops(run: Run, rollout: Rollout, with_sft: bool, seconds: float) -> dict[str, float]:
    """``perf/step_tflop`` (the analytic model FLOPs of this step's shapes on one GPU, without gradient
    checkpointing's recompute, from `observe.flops`), ``perf/tflops`` (that over the measured step
    time: TFLOP/s achieved per GPU) and ``perf/mfu`` (over ``--log_tflops_peak``)."""
    cfg = run.cfg
    assert run.shape is not None
    step = StepShape(
        prompts=cfg.prompts_per_rank_for(run.world.world_size), rollout_n=cfg.rollout_n,
        num_inference_steps=cfg.num_inference_steps, num_train_timesteps=cfg.num_train_timesteps,
        image_height=cfg.image_height, image_width=cfg.image_width, cfg_scale=cfg.cfg_scale, beta=cfg.beta,
        gradient_checkpointing=cfg.gradient_checkpointing,
        sftaux_batch=(cfg.sftaux_micro_batch_size or cfg.atrain_micro_batch_size) if with_sft else 0,
        prompt_tokens=rollout.cond.prompt_embeds.shape[1] - run.shape.deepgen.num_queries,
    )  # fmt: skip
    flops = model_flops(step_flops(step, run.shape))
    return {
        "perf/step_tflop": flops / 1e12,
        "perf/tflops": flops / seconds / 1e12,
        "perf/mfu": utilisation(flops, seconds, cfg.log_tflops_peak * 1e12),
    }


def log_step(run: Run, step: int, metrics: dict[str, float]) -> None:
    """Metrics (averaged over ranks) to the trackers and `<output_dir>/metrics.jsonl`, one line to the log."""
    metrics = run.world.mean_over_ranks(metrics)
    if not run.world.is_main:
        return
    sent = metrics if run.window is None else run.window.add(step, metrics, last=step >= run.total_steps)
    if sent is not None:  # --logging_steps: the trackers get the means since their last send
        run.tracker.log(sent, step=step)
    with (Path(run.cfg.output_dir) / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **{k: _json_float(v) for k, v in metrics.items()}}) + "\n")
    for name, value in metrics.items():
        if name.startswith("eval/") and name.endswith("/overall"):
            pooled = metrics.get(name.removesuffix("overall") + "pooled", math.nan)
            log.info("step %d %s: %.4f (mean of primary dimensions; pooled %.4f)", step, name, value, pooled)
    if "reward/total" in metrics:
        log.info(
            "step %d/%d: reward %.4f, loss %.3e, clipfrac %.3f, %.1f s (rollout %.1f, reward wait %.1f, update %.1f)",
            step, run.total_steps, metrics["reward/total"], metrics.get("policy/loss", math.nan),
            metrics.get("policy/clipfrac", math.nan), metrics["time/step"], metrics["time/rollout"],
            metrics["time/reward"], metrics["time/update"],
        )  # fmt: skip


def run_eval(run: Run, step: int) -> dict[str, float]:
    """Every evaluation of the eval YAML (one by default, named after the service's set); metrics under
    eval/<name>/, contact sheets and the first --eval_{wandb,swanlab}_num_upload_images images to the
    trackers (rank 0)."""
    cfg = run.cfg
    run.model.eval()
    sampling = EvalSampling(
        mode=cfg.eval_inference_mode, sampler=cfg.atrain_sde_sampler,
        eta=cfg.sde_eta if cfg.eval_sde_eta is None else cfg.eval_sde_eta,
        height=cfg.eval_image_height or cfg.image_height, width=cfg.eval_image_width or cfg.image_width,
        batch_size=cfg.eval_micro_batch_size or cfg.rollout_micro_batch_size,
        uploads=max(cfg.eval_wandb_num_upload_images, cfg.eval_swanlab_num_upload_images),
    )  # fmt: skip
    metrics = {}
    with ema_dit(run.model, run.ema) if cfg.eval_with_ema and run.ema is not None else contextlib.nullcontext():
        for plan in run.eval_plans:
            outcome = evaluate(
                run.model, run.eval_client, run.world, step, plan, sampling, output_dir=Path(cfg.output_dir)
            )
            if outcome is not None:
                metrics |= outcome.metrics
                label = plan.name or (outcome.summary.benchmark if outcome.summary else "")
                run.tracker.log_images({f"eval/{label}/contact_sheet": outcome.contact_sheet}, step=step)
                for backend, count in (("wandb", cfg.eval_wandb_num_upload_images),
                                       ("swanlab", cfg.eval_swanlab_num_upload_images)):  # fmt: skip
                    if count:
                        run.tracker.log_image_list(f"eval/{label}", outcome.uploads[:count], step, backend)
    return metrics


def checkpoint(run: Run, step: int) -> Path:
    """Write the checkpoint of `step` on every rank (rank 0 writes the shared files), then prune past
    ``--save_total_limit``; returns its folder."""
    cfg, world = run.cfg, run.world
    sampler_state = {"prompts": run.sampler.state_dict()}
    if run.sftaux is not None:
        sampler_state["sftaux"] = run.sftaux.state_dict()
    path = save_checkpoint(
        cfg.output_dir,
        step,
        trainable=run.updater.trainable_state(world.is_main),
        deepgen_only=run.model.deepgen_only_state() if world.is_main else None,
        ema=run.ema.state_dict() if run.ema is not None and world.is_main else None,
        sampling_policy=run.sampling_policy.state_dict() if run.sampling_policy is not None and world.is_main else None,
        sampler_state=sampler_state,
        config=cfg.to_dict(),
        rank=world.rank,
        world_size=world.world_size,
        barrier=world.barrier,
        **run.updater.checkpoint_state(),
    )
    if world.is_main:
        log.info("checkpoint written: %s", path)
        if cfg.save_total_limit is not None:
            prune_checkpoints(cfg.output_dir, cfg.save_total_limit)
    world.barrier()
    return path


def check_ranks_agree(updater: Updater, world: World) -> None:
    """Data parallelism keeps one DiT on every rank: compare a checksum of the weights across ranks
    (under ZeRO-3 of the weights gathered from their partitions)."""
    if not world.distributed:
        return
    with torch.no_grad():
        params = list(updater.trainable_state(is_main=True).values())
        local = torch.stack([sum(p.double().sum() for p in params), sum(p.double().abs().sum() for p in params)])
    checksums = world.all_gather_cat(local.to(world.device)[None]).cpu()
    if not torch.equal(checksums, checksums[:1].expand_as(checksums)):
        raise RuntimeError(f"ranks hold different DiT weights (checksums {checksums.tolist()}): data parallelism broke")
    log.info("all %d ranks hold identical DiT weights (checksum %.10g)", world.world_size, checksums[0, 0].item())


def _nanmean(t: torch.Tensor) -> float:
    valid = t[~torch.isnan(t)]
    return valid.mean().item() if len(valid) else math.nan


def _json_float(v: float) -> float | None:
    return None if isinstance(v, float) and not math.isfinite(v) else v
