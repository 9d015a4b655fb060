"""`python -m deepgen_trainer.train` (under `torchrun` for several GPUs): MR-GRPO training of DeepGen.

One step, on every rank, in the order of `train()`:
1. rollout (`generate`): `rollout_n` images per prompt from one shared initial noise, SDE sampling
   with the log-prob of every transition kept in float32; each generation micro-batch is decoded and
   sent to the reward models at once, so scoring overlaps the next micro-batch's generation. With
   `--one_step_off_policy` the next step's rollout is generated while this step's images are scored;
2. rewards: wait for the scores, an (N, K) matrix with NaN for failed / not-applicable entries;
3. advantages (`--atrain_adv_type`, per-dataset reward weights; missing rewards are neutral);
4. policy update (`update_policy`): `num_train_timesteps` random SDE steps (never the last), every
   training micro-batch: clipped ratio loss + β·KL against the frozen initial DiT, one backward each;
5. SFT auxiliary loss on one image-caption batch (`--sftaux_dataset_config`), its own backward before the last;
6. `--optimizer_steps_per_rollout` optimizer steps (1 by default) over consecutive chunks of the
   trained timesteps (`--step_per_backward` emulates the reference's step after every backward);
7. evaluate every `--eval_freq` (the DiT's EMA with `--eval_with_ema`), log, checkpoint every
   `--save_steps`; stop with a checkpoint when a reward has failed for all its samples
   `--reward_failure_patience` steps in a row.
With `--ema_decay` the EMA of the DiT moves after every optimizer step. A run resumes from the newest
complete checkpoint in `--output_dir` (see `run.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from deepgen_trainer.algorithms.advantages import clamp_fraction, compute_advantages, weighted_reward_sum
from deepgen_trainer.algorithms.policy_loss import (
    approx_kl,
    clipped_policy_loss,
    flow_matching_inputs,
    flow_matching_loss,
    kl_penalty,
)
from deepgen_trainer.algorithms.rollout import sde_rollout
from deepgen_trainer.algorithms.sde import sde_step_with_logprob
from deepgen_trainer.checkpoints.ema import ema_dit
from deepgen_trainer.checkpoints.run_checkpoint import prune_checkpoints, save_checkpoint
from deepgen_trainer.config import ConfigError, TrainConfig, parse_args
from deepgen_trainer.data.prompts import DataConfigError
from deepgen_trainer.data.sftaux import SftAuxLoader
from deepgen_trainer.engine.distributed import World, close_world, init_world
from deepgen_trainer.engine.optim import Updater
from deepgen_trainer.evaluation.evaluate import evaluate
from deepgen_trainer.model.deepgen import Conditioning, DeepGen, to_uint8
from deepgen_trainer.rewards.outage import FailureWatch, RewardOutage
from deepgen_trainer.rewards.scorer import RewardBatch, reward_metrics
from deepgen_trainer.run import Run, reward_url, setup

log = logging.getLogger("deepgen_trainer")


def train(cfg: TrainConfig, world: World | None = None, model: DeepGen | None = None) -> DeepGen:
    """Run MR-GRPO training to `total_steps`; returns the trained model. `model`: one built by the caller
    instead of `--model`'s (see `run.setup`)."""
    world = world or init_world()
    run = setup(cfg, world, model)
    model, updater = run.model, run.updater
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
            t_rollout, t_local = (rollout.seconds, rollout.local_reward_seconds) if ahead is None else (0.0, 0.0)
            ahead = None
            if cfg.one_step_off_policy and step < run.total_steps and not _saves(run, step):
                ahead = generate(run, step + 1)
                t_rollout, t_local = t_rollout + ahead.seconds, t_local + ahead.local_reward_seconds

            # 2. rewards
            rewards: RewardBatch = run.scorer.gather(rollout.pending)

            # 3. advantages
            advantages = compute_advantages(
                cfg.atrain_adv_type, rewards.rewards, rollout.weights, cfg.rollout_n, eps=cfg.adv_eps,
                clip=cfg.adv_clip, all_gather=world.all_gather_cat if cfg.global_adv_stats else None,
            ).to(world.device)  # fmt: skip

            # 4.-6. policy update (+ SFT auxiliary loss), --optimizer_steps_per_rollout optimizer steps
            t0 = time.perf_counter()
            lag = updater.optimizer_steps - rollout.policy_version
            stats, grad_norm = update_policy(run, rollout, advantages, step)
            t_update = time.perf_counter() - t0

            # 7. evaluate, log, checkpoint
            t_step_total = time.perf_counter() - t_step
            n_images = len(rollout.prompts)
            metrics = {
                **reward_metrics(run.reward_names, rewards.rewards, rewards.status),
                "reward/total": _nanmean(weighted_reward_sum(rewards.rewards, rollout.weights)),
                "adv/mean": advantages.mean().item(),
                "adv/std": advantages.std().item() if len(advantages) > 1 else 0.0,
                "adv/clamp_frac": clamp_fraction(advantages, cfg.adv_clip).item(),
                **stats.means(),
                "policy/lag": float(lag),
                "time/rollout": t_rollout - t_local,  # generation and decoding
                "time/clip_sim": t_local,  # the in-process rewards, scored as each micro-batch is decoded
                "time/reward": rewards.wait_s,
                "time/update": t_update,
                "time/step": t_step_total,
                "perf/images_per_sec_per_gpu": n_images / t_step_total,
                "perf/images_per_sec": n_images * world.world_size / t_step_total,
                "lr": updater.lr,
                "grad_norm": grad_norm,
                "optim/steps": float(updater.optimizer_steps),
            }
            if run.eval_client is not None and cfg.eval_freq and step % cfg.eval_freq == 0:
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
        check_ranks_agree(updater, world)
    finally:
        progress.close()
        run.scorer.close()
        run.tracker.close()
        if run.eval_client is not None:
            run.eval_client.close()
    return model


# ------------------------------------------------------------------------------------------- the phases


@dataclass
class Rollout:
    """One step's rollout on this rank, its rewards requested.

    prompts: N = prompts × rollout_n prompts, one per image; weights: (N, K) dataset weight per reward;
    cond: the N conditionings; latents: (T + 1, N, C, h, w) float32; old_log_probs: (T, N) float32
    under the generating policy; sigmas: (T + 1,) grid; pending: the reward micro-batches in flight;
    generator: the step's RNG, which continues into the update (SFT noise); policy_version: optimizer
    steps taken when it was generated; sampler_state: the prompt sampler before this batch was drawn;
    seconds: the whole generation, local_reward_seconds: the part spent in in-process rewards (clip_sim).
    """

    prompts: list[str]
    weights: torch.Tensor
    cond: Conditioning
    latents: torch.Tensor
    old_log_probs: torch.Tensor
    sigmas: torch.Tensor
    pending: list[Future[RewardBatch]]
    generator: torch.Generator
    policy_version: int
    sampler_state: dict[str, Any]
    seconds: float
    local_reward_seconds: float


def generate(run: Run, step: int) -> Rollout:
    """Draw the step's prompts, sample `rollout_n` SDE trajectories per prompt and send every decoded
    generation micro-batch to the reward models at once."""
    cfg, model, world = run.cfg, run.model, run.world
    t0 = time.perf_counter()
    n = cfg.rollout_n
    sampler_state = run.sampler.state_dict()
    batch = next(run.sampler)
    prompts = [p for p in batch.prompts for _ in range(n)]
    weights = run.data.reward_weight_matrix(batch.dataset_indices, run.reward_names).repeat_interleave(n, 0)
    group_ids = [f"s{step}-r{world.rank}-p{i // n}" for i in range(len(prompts))]
    g = torch.Generator(world.device).manual_seed(_step_seed(cfg.seed, step, world.rank))
    model.eval()
    cond = model.encode_prompts(list(batch.prompts)).repeat_interleave(n)
    noise = initial_noise(model, cfg, len(batch.prompts), g)
    trajectories, pending = [], []
    local_s = 0.0
    mb = cfg.rollout_micro_batch_size
    for s in range(0, len(prompts), mb):
        trajectory = sde_rollout(
            model, noise[s : s + mb], cond[s : s + mb], model.sigmas(cfg.num_inference_steps),
            cfg.atrain_sde_sampler, cfg.sde_eta, cfg_scale=cfg.cfg_scale, uncond=run.uncond, generator=g,
            exact_logprob=cfg.exact_logprob, min_std=cfg.logprob_min_std,
        )  # fmt: skip
        trajectories.append(trajectory)
        images = to_uint8(model.decode(trajectory.final))
        sl = slice(s, s + mb)
        t_submit = time.perf_counter()  # submit returns once the in-process rewards have scored
        pending.append(run.scorer.submit(images, prompts[sl], group_ids[sl], weights[sl]))
        local_s += time.perf_counter() - t_submit
    return Rollout(
        prompts, weights, cond,
        latents=torch.cat([t.latents for t in trajectories], dim=1),
        old_log_probs=torch.cat([t.log_probs for t in trajectories], dim=1),
        sigmas=trajectories[0].sigmas, pending=pending, generator=g,
        policy_version=run.updater.optimizer_steps, sampler_state=sampler_state,
        seconds=time.perf_counter() - t0, local_reward_seconds=local_s,
    )  # fmt: skip


def update_policy(run: Run, rollout: Rollout, advantages: torch.Tensor, step: int) -> tuple[_Mean, float]:
    """Clipped policy loss (+ β·KL) on `num_train_timesteps` random SDE steps (never the last,
    deterministic one), every training micro-batch, one backward each; the SFT auxiliary loss joins
    the last backward. The chosen timesteps are split into `optimizer_steps` consecutive chunks with
    one optimizer step each (Flow-GRPO uses 2), so from the second on the ratios move off 1 and
    clipping acts. Returns the pass statistics and the last gradient norm."""
    cfg, model, updater = run.cfg, run.model, run.updater
    model.train()
    sigmas, latents, cond = rollout.sigmas, rollout.latents, rollout.cond
    chosen = torch.randperm(len(sigmas) - 2, generator=torch.Generator().manual_seed(_step_seed(cfg.seed, step, 0)))
    chosen = chosen[: cfg.num_train_timesteps].tolist()
    micro = cfg.atrain_micro_batch_size
    passes = [(j, s) for j in chosen for s in range(0, len(rollout.prompts), micro)]
    n_steps = cfg.optimizer_steps(run.world.world_size)
    per_step = len(passes) // n_steps
    # (1 − λ)·mean over the passes of one optimizer step; + λ·L_sft once per rollout batch.
    grpo_scale = (1.0 - _sft_coef(cfg, run)) / per_step
    stats = _Mean()
    grad_norm = math.nan
    for i, (j, s) in enumerate(passes):
        sl = slice(s, s + micro)
        x, x_next = latents[j, sl], latents[j + 1, sl]
        v = model.velocity(x, sigmas[j].item(), cond[sl], cfg.cfg_scale, run.uncond)
        _, log_prob, mean, std = sde_step_with_logprob(
            cfg.atrain_sde_sampler, v, x, sigmas[j].item(), sigmas[j + 1].item(), cfg.sde_eta,
            prev_sample=x_next, exact_logprob=cfg.exact_logprob, min_std=cfg.logprob_min_std,
        )  # fmt: skip
        old = rollout.old_log_probs[j, sl]
        loss, ratio, clipped = clipped_policy_loss(log_prob, old, advantages[sl], cfg.clip_range)
        if run.reference is not None:
            kl = kl_to_reference(run, x, x_next, v, mean, std, sigmas[j].item(), sigmas[j + 1].item(), cond[sl])
            loss = loss + cfg.beta * kl
            stats.add("policy/kl", kl.mean())
        total = loss.mean() * grpo_scale
        if run.sftaux is not None and i == len(passes) - 1:
            sft_loss = sft_auxiliary_loss(model, run.sftaux, micro, rollout.generator)
            updater.backward_small(cfg.sftaux_coef * sft_loss)  # its own backward: a bf16 sum would drop it
            stats.add("sft/loss", sft_loss)
        updater.backward(total)
        if (i + 1) % per_step == 0:
            grad_norm = optimizer_step(run)
        stats.add("policy/loss", loss.mean())
        stats.add("policy/clipfrac", clipped.float().mean())
        if cfg.optimizer_steps_per_rollout > 1:
            stats.add(f"policy/clipfrac/opt_step{i // per_step + 1}", clipped.float().mean())
        stats.add("policy/ratio_mean", ratio.mean())
        stats.add("policy/approx_kl", approx_kl(log_prob, old))
    return stats, grad_norm


def initial_noise(model: DeepGen, cfg: TrainConfig, n_prompts: int, generator: torch.Generator) -> torch.Tensor:
    """(n_prompts · rollout_n, C, h, w): with `--init_same_noise` the images of a group share one noise,
    so their differences come from the SDE noise alone."""
    shape = model.latent_shape(cfg.image_height, cfg.image_width)
    n = cfg.rollout_n
    if cfg.init_same_noise:
        noise = torch.randn((n_prompts, *shape), generator=generator, device=generator.device)
        return noise.repeat_interleave(n, dim=0)
    return torch.randn((n_prompts * n, *shape), generator=generator, device=generator.device)


def kl_to_reference(
    run: Run,
    x: torch.Tensor,
    x_next: torch.Tensor,
    v: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    sigma: float,
    sigma_next: float,
    cond: Conditioning,
) -> torch.Tensor:
    """Per-sample KL penalty against the frozen initial DiT: on velocities (`v-based`) or on the
    step means (`x-based`)."""
    cfg = run.cfg
    with torch.no_grad():
        v_ref = run.model.velocity(x, sigma, cond, cfg.cfg_scale, run.uncond, dit=run.reference)
        if cfg.atrain_kl_type == "v-based":
            return kl_penalty("v-based", v, v_ref, std)
        _, _, mean_ref, _ = sde_step_with_logprob(
            cfg.atrain_sde_sampler, v_ref, x, sigma, sigma_next, cfg.sde_eta, prev_sample=x_next
        )
    return kl_penalty("x-based", mean, mean_ref, std)


def sft_auxiliary_loss(
    model: DeepGen, loader: SftAuxLoader, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Flow-matching loss on a batch of real images: x_σ = (1 − σ)z + σε, target ε − z, σ drawn from
    the scheduler's shifted training distribution σ = s·u / (1 + (s − 1)·u), u ~ U(0, 1)."""
    images, captions = loader.next_batch(batch_size)  # images in [-1, 1]
    latents = model.encode_images((images + 1.0) / 2.0, generator=None)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
    u = torch.rand(latents.shape[0], generator=generator, device=generator.device).to(latents.device)
    shift = float(model.scheduler.config.shift)
    sigma = shift * u / (1.0 + (shift - 1.0) * u)
    v = model.velocity(flow_matching_inputs(latents, noise, sigma), sigma, model.encode_prompts(captions))
    return flow_matching_loss(v, latents, noise).mean()


def optimizer_step(run: Run) -> float:
    """One optimizer step, then one EMA step (with `--ema_decay`); returns the gradient norm."""
    grad_norm = run.updater.step()
    if run.ema is not None:
        run.ema.update(run.updater.trainable_state(is_main=True))
    return grad_norm


def checkpoint(run: Run, step: int) -> Path:
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


def run_eval(run: Run, step: int) -> dict[str, float]:
    """Every evaluation of the eval YAML (one by default, named after the service's set); metrics under
    eval/<name>/, contact sheets to the trackers (rank 0)."""
    assert run.eval_client is not None
    cfg = run.cfg
    run.model.eval()
    metrics = {}
    with ema_dit(run.model, run.ema) if cfg.eval_with_ema and run.ema is not None else contextlib.nullcontext():
        for name, cfg_scale, num_inference_steps in run.eval_plans:
            outcome = evaluate(
                run.model, run.eval_client, run.world, step, output_dir=Path(cfg.output_dir), label=name,
                height=cfg.image_height, width=cfg.image_width, num_inference_steps=num_inference_steps,
                cfg_scale=cfg_scale, batch_size=cfg.rollout_micro_batch_size,
            )  # fmt: skip
            if outcome is not None:
                metrics |= outcome.metrics
                label = name or outcome.summary.benchmark
                run.tracker.log_images({f"eval/{label}/contact_sheet": outcome.contact_sheet}, step=step)
    return metrics


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


def log_step(run: Run, step: int, metrics: dict[str, float]) -> None:
    """Metrics (averaged over ranks) to the trackers and `<output_dir>/metrics.jsonl`, one line to the log."""
    metrics = run.world.mean_over_ranks(metrics)
    if not run.world.is_main:
        return
    run.tracker.log(metrics, step=step)
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


# ------------------------------------------------------------------------------------------- small helpers


class _Mean:
    """Running means of per-pass scalars."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        value = value.detach().item() if isinstance(value, torch.Tensor) else value
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def _all_ranks(world: World, status: torch.Tensor) -> torch.Tensor:
    """The (N, K) reward status codes of every rank, concatenated (this rank's alone when not distributed)."""
    if not world.distributed:
        return status
    return world.all_gather_cat(status.to(world.device, torch.float32)).to("cpu", torch.int8)


def _saves(run: Run, step: int) -> bool:
    """A checkpoint is written after this step."""
    return step % run.cfg.save_steps == 0 or step == run.total_steps


def _sft_coef(cfg: TrainConfig, run: Run) -> float:
    return cfg.sftaux_coef if run.sftaux is not None else 0.0


def _step_seed(seed: int, step: int, rank: int) -> int:
    """A distinct seed per (run seed, step, rank): a resumed run draws the same noise as an unbroken one."""
    return (seed * 1_000_003 + step * 10_007 + rank) % (2**63)


def _nanmean(t: torch.Tensor) -> float:
    valid = t[~torch.isnan(t)]
    return valid.mean().item() if len(valid) else math.nan


def _json_float(v: float) -> float | None:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
