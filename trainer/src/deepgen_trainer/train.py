"""`python -m deepgen_trainer.train` (under `torchrun` for several GPUs): MR-GRPO training of DeepGen.

One step, on every rank, in the order of `train()`:
1. rollout (`generate`): `rollout_n` images per prompt from one shared initial noise, SDE sampling
   with the log-prob of every transition kept in float32; each generation micro-batch is decoded and
   sent to the reward models at once, so scoring overlaps the next micro-batch's generation. With
   `--one_step_off_policy` the next step's rollout is generated while this step's images are scored;
2. rewards: wait for the scores, an (N, K) matrix with NaN for failed / not-applicable entries;
3. advantages (`--atrain_adv_type`, per-dataset reward weights; missing rewards are neutral);
4. policy update (`update_policy`): `num_train_timesteps` random SDE steps (never the last), every
   training micro-batch: clipped ratio loss + β·KL against the frozen initial DiT, one backward each
   (`--atrain_algorithm grpoguard`: after RatioNorm; `diffusionnft`: the forward-process loss);
5. SFT auxiliary loss on one image-caption batch (`--sftaux_dataset_config`), its own backward before the last;
6. `--optimizer_steps_per_rollout` optimizer steps (1 by default) over consecutive chunks of the
   trained timesteps (`--step_per_backward` emulates the reference's step after every backward);
7. evaluate every `--eval_freq` (the DiT's EMA with `--eval_with_ema`), log, checkpoint every
   `--save_steps`; stop with a checkpoint when a reward has failed for all its samples
   `--reward_failure_patience` steps in a row.
With `--ema_decay` the EMA of the DiT moves after every optimizer step; with `--atrain_algorithm
diffusionnft --atrain_nft_off_policy` the sampling copy of the DiT moves after every step. A run resumes
from the newest complete checkpoint in `--output_dir`, both included (see `run.py`).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from deepgen_trainer.algorithms.advantages import clamp_fraction, compute_advantages, weighted_reward_sum
from deepgen_trainer.algorithms.diffusion_nft import (
    forward_noised,
    nft_loss,
    old_policy_decay,
    optimality_probability,
    velocity_kl,
)
from deepgen_trainer.algorithms.grpo_guard import grpo_guard_loss, guard_metrics
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
from deepgen_trainer.evaluation.evaluate import EvalSampling, evaluate
from deepgen_trainer.model.deepgen import Conditioning, DeepGen, to_uint8
from deepgen_trainer.observe.flops import StepShape, model_flops, step_flops, utilisation
from deepgen_trainer.observe.grad_norms import GradParts
from deepgen_trainer.observe.training_samples import save_training_samples
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
            global_stats = cfg.global_adv_stats or cfg.atrain_algorithm == "diffusionnft"  # NFT: a global std
            advantages = compute_advantages(
                cfg.advantage_type, rewards.rewards, rollout.weights, cfg.rollout_n, eps=cfg.adv_eps,
                clip=cfg.adv_clip, all_gather=world.all_gather_cat if global_stats else None,
            ).to(world.device)  # fmt: skip

            if cfg.log_images_interval and step % cfg.log_images_interval == 0 and world.is_main:
                assert rollout.first_group is not None
                save_training_samples(
                    Path(cfg.output_dir), step, rollout.first_group, rollout.prompts[0],
                    advantages[: cfg.rollout_n].tolist(), cfg.log_images_keep,
                )  # fmt: skip

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
            measured = (
                step % _every(cfg.log_tflops_every, cfg) == 0 and step - run.start_step > cfg.log_tflops_warmup_steps
            )
            if run.shape is not None and measured:
                metrics |= step_tflops(run, rollout, "sft/loss" in metrics, t_step_total)
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
        check_ranks_agree(updater, world)
    finally:
        progress.close()
        run.scorer.close()
        run.tracker.close()
        if run.sftaux is not None:
            run.sftaux.close()
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
    old_means: (len(mean_steps), N, C, h, w) float32, the step means μ_old of the trained steps
    `mean_steps` (GRPO-Guard only, else None).
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
    first_group: torch.Tensor | None = None  # uint8 (rollout_n, H, W, 3), the first prompt's images
    old_means: torch.Tensor | None = None
    mean_steps: list[int] = field(default_factory=list)


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
    first_group = None
    local_s = 0.0
    mb = cfg.rollout_micro_batch_size
    # GRPO-Guard keeps μ_old of the steps the update will train; DiffusionNFT off-policy samples with its copy.
    mean_steps = trained_steps(cfg, step) if cfg.atrain_algorithm == "grpoguard" else []
    policy = run.sampling_policy or model
    for s in range(0, len(prompts), mb):
        trajectory = sde_rollout(
            policy, noise[s : s + mb], cond[s : s + mb], model.sigmas(cfg.num_inference_steps),
            cfg.atrain_sde_sampler, cfg.rollout_eta, cfg_scale=cfg.cfg_scale, uncond=run.uncond, generator=g,
            exact_logprob=cfg.scores_exact_logprob, min_std=cfg.logprob_min_std, keep_means=mean_steps,
        )  # fmt: skip
        trajectories.append(trajectory)
        images = to_uint8(model.decode(trajectory.final))
        if s == 0:
            first_group = images[:n].cpu()
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
        seconds=time.perf_counter() - t0, first_group=first_group, local_reward_seconds=local_s,
        old_means=torch.cat([t.means for t in trajectories], dim=1) if mean_steps else None, mean_steps=mean_steps,
    )  # fmt: skip


def update_policy(run: Run, rollout: Rollout, advantages: torch.Tensor, step: int) -> tuple[_Mean, float]:
    """Policy loss (+ β·KL) on `num_train_timesteps` random SDE steps (never the last, deterministic
    one), every training micro-batch, one backward each; the SFT auxiliary loss joins the last
    backward. The loss is `--atrain_algorithm`'s: the clipped ratio (flowgrpo), the same after
    RatioNorm (grpoguard, `ratio_pass`) or DiffusionNFT's forward-process loss (`nft_pass`). The
    chosen timesteps are split into `optimizer_steps` consecutive chunks with one optimizer step each
    (Flow-GRPO uses 2), so from the second on the ratios move off 1 and clipping acts. Returns the
    pass statistics and the last gradient norm."""
    cfg, model, updater = run.cfg, run.model, run.updater
    model.train()
    chosen = trained_steps(cfg, step)
    micro = cfg.atrain_micro_batch_size
    passes = [(j, s) for j in chosen for s in range(0, len(rollout.prompts), micro)]
    n_steps = cfg.optimizer_steps(run.world.world_size)
    per_step = len(passes) // n_steps
    # (1 − λ)·mean over the passes of one optimizer step; + λ·L_sft once per rollout batch.
    grpo_scale = (1.0 - _sft_coef(cfg, run)) / per_step
    stats = _Mean()
    grad_norm = math.nan
    parts = (
        run.grad_parts
        if run.grad_parts is not None and step % _every(cfg.log_component_grad_norm_every, cfg) == 0
        else None
    )
    if parts is not None:
        parts.start()
    if cfg.atrain_algorithm == "diffusionnft":
        r = optimality_probability(advantages, cfg.atrain_nft_adv_clip_range)
        for name, value in (("mean", r.mean()), ("min", r.min()), ("max", r.max())):
            stats.add(f"nft/r_{name}", value)
    for i, (j, s) in enumerate(passes):
        sl = slice(s, s + micro)
        # The one dispatch on the update rule: a per-sample loss, the KL to the reference (None without
        # one) and which samples the ratio clipped (None for DiffusionNFT, which has no ratio).
        if cfg.atrain_algorithm == "diffusionnft":
            loss, kl, clipped = nft_pass(run, rollout, r[sl], j, sl, stats)
        else:
            loss, kl, clipped = ratio_pass(run, rollout, advantages[sl], j, sl, stats)
        pieces = [("policy", loss.mean() * grpo_scale)]
        if kl is not None:
            pieces.append(("beta_kl", (cfg.beta * kl).mean() * grpo_scale))
            loss = loss + cfg.beta * kl
            stats.add("policy/kl", kl.mean())
        # --sftaux_every_n_steps: the first step and every N-th after it, as the original (global_step % N).
        if run.sftaux is not None and i == len(passes) - 1 and (step - 1) % cfg.sftaux_every_n_steps == 0:
            sft_batch = cfg.sftaux_micro_batch_size or micro
            sft_loss = sft_auxiliary_loss(model, run.sftaux, sft_batch, rollout.generator)
            # Its own backward: added to the policy loss before one backward, bf16 would round it away.
            updater.backward_small(backward_loss([("sftaux", cfg.sftaux_coef * sft_loss)], parts))
            stats.add("sft/loss", sft_loss)
        updater.backward(backward_loss(pieces, parts))
        if (i + 1) % per_step == 0:
            grad_norm = optimizer_step(run)
        stats.add("policy/loss", loss.mean())
        if clipped is not None:
            stats.add("policy/clipfrac", clipped.float().mean())
            if cfg.optimizer_steps_per_rollout > 1:
                stats.add(f"policy/clipfrac/opt_step{i // per_step + 1}", clipped.float().mean())
    if parts is not None:
        for name, value in parts.finish(run.world.all_reduce_mean_).items():
            stats.add(name, value)
    if run.sampling_policy is not None:  # DiffusionNFT off-policy: the sampling copy follows the trained DiT
        decay = old_policy_decay(step, cfg.atrain_nft_decay_type)
        run.sampling_policy.soft_update(updater.trainable_state(is_main=True), decay)
        stats.add("nft/old_decay", decay)
    return stats, grad_norm


def backward_loss(pieces: list[tuple[str, torch.Tensor]], parts: GradParts | None) -> torch.Tensor:
    """The loss of one backward call: the pieces' sum; when the gradient parts are measured
    (--log_component_grad_norm), a loss with the same gradient whose pieces were measured apart."""
    if parts is not None:
        return parts.measure(pieces)
    total = pieces[0][1]
    for _, loss in pieces[1:]:
        total = total + loss
    return total


def trained_steps(cfg: TrainConfig, step: int) -> list[int]:
    """The step's `num_train_timesteps` SDE step indices (never the last), drawn from the run seed and
    the step alone: every rank, and the rollout that keeps GRPO-Guard's μ_old, draws the same."""
    g = torch.Generator().manual_seed(_step_seed(cfg.seed, step, 0))
    return torch.randperm(cfg.num_inference_steps - 1, generator=g)[: cfg.num_train_timesteps].tolist()


def ratio_pass(
    run: Run, rollout: Rollout, advantages: torch.Tensor, j: int, sl: slice, stats: _Mean
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """flowgrpo and grpoguard on step j of the micro-batch `sl`: recompute v_θ (with grad), score the
    stored transition with the same sampler, clip the ratio (GRPO-Guard: after RatioNorm, weighted
    by 1/(−dt), metrics per noise bucket). Returns the per-sample loss, KL (or None) and clip mask."""
    cfg, model = run.cfg, run.model
    sigma, sigma_next = rollout.sigmas[j].item(), rollout.sigmas[j + 1].item()
    x, x_next, cond = rollout.latents[j, sl], rollout.latents[j + 1, sl], rollout.cond[sl]
    v = model.velocity(x, sigma, cond, cfg.cfg_scale, run.uncond)
    _, log_prob, mean, std = sde_step_with_logprob(
        cfg.atrain_sde_sampler, v, x, sigma, sigma_next, cfg.sde_eta, prev_sample=x_next,
        exact_logprob=cfg.scores_exact_logprob, min_std=cfg.logprob_min_std,
    )  # fmt: skip
    old = rollout.old_log_probs[j, sl]
    if cfg.atrain_algorithm == "grpoguard":
        assert rollout.old_means is not None, "a GRPO-Guard rollout keeps the trained steps' means"
        old_mean = rollout.old_means[rollout.mean_steps.index(j), sl]
        guard = grpo_guard_loss(
            log_prob, old, mean, old_mean, std, sigma_next - sigma, advantages, cfg.clip_range, cfg.clip_range_high
        )
        loss, ratio, clipped = guard.loss, guard.ratio, guard.clipped
        for name, value in guard_metrics(guard, sigma).items():
            stats.add(name, value)
    else:
        loss, ratio, clipped = clipped_policy_loss(log_prob, old, advantages, cfg.clip_range, cfg.clip_range_high)
    stats.add("policy/ratio_mean", ratio.mean())
    stats.add("policy/approx_kl", approx_kl(log_prob, old))
    kl = None
    if run.reference is not None:
        kl = kl_to_reference(run, x, x_next, v, mean, std, sigma, sigma_next, cond)
    return loss, kl, clipped


def nft_pass(
    run: Run, rollout: Rollout, r: torch.Tensor, j: int, sl: slice, stats: _Mean
) -> tuple[torch.Tensor, torch.Tensor | None, None]:
    """diffusionnft at step j's noise level t = σ_j for the micro-batch `sl`: fresh noise per sample on
    the final clean latent, x_t = (1 − t)·x0 + t·ε; v_θ (with grad) against v_old (the sampling copy
    off-policy, v_θ detached on-policy) weighted by the optimality probabilities r. Returns the
    per-sample loss, the KL mean((v_θ − v_ref)²) (or None) and None (no ratio to clip)."""
    cfg, model, g = run.cfg, run.model, rollout.generator
    t, x0, cond = rollout.sigmas[j].item(), rollout.latents[-1, sl], rollout.cond[sl]
    x_t = forward_noised(x0, torch.randn(x0.shape, generator=g, device=g.device).to(x0.device), t)
    v = model.velocity(x_t, t, cond, cfg.cfg_scale, run.uncond)
    if run.sampling_policy is not None:
        v_old = run.sampling_policy.velocity(x_t, t, cond, cfg.cfg_scale, run.uncond)
    else:
        v_old = v.detach()
    out = nft_loss(v, v_old, x_t, x0, t, r, cfg.atrain_nft_beta)
    stats.add("nft/positive_loss", out.positive.mean())
    stats.add("nft/negative_loss", out.negative.mean())
    kl = None
    if run.reference is not None:
        with torch.no_grad():
            v_ref = model.velocity(x_t, t, cond, cfg.cfg_scale, run.uncond, dit=run.reference)
        kl = velocity_kl(v, v_ref)
    return out.loss, kl, None


def initial_noise(model: DeepGen, cfg: TrainConfig, n_prompts: int, generator: torch.Generator) -> torch.Tensor:
    """(n_prompts · rollout_n, C, h, w): with `--init_same_noise` the images of a group share one noise,
    so their differences come from the SDE noise alone (never under DiffusionNFT: see
    `TrainConfig.shared_initial_noise`)."""
    shape = model.latent_shape(cfg.image_height, cfg.image_width)
    n = cfg.rollout_n
    if cfg.shared_initial_noise:
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
    if cfg.atrain_kl_type == "v-based":  # outside no_grad: the penalty's gradient flows through v
        return kl_penalty("v-based", v, v_ref, std)
    with torch.no_grad():
        _, _, mean_ref, _ = sde_step_with_logprob(
            cfg.atrain_sde_sampler, v_ref, x, sigma, sigma_next, cfg.sde_eta, prev_sample=x_next
        )
    return kl_penalty("x-based", mean, mean_ref, std)


def sft_auxiliary_loss(
    model: DeepGen, loader: SftAuxLoader, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """Flow-matching loss on a batch of real images: x_σ = (1 − σ)z + σε, target ε − z, σ drawn from
    the scheduler's shifted training distribution σ = s·u / (1 + (s − 1)·u), u ~ U(0, 1). Images of
    different sizes (the original's configs keep each image's size) go through the DiT in one call per
    size; the loss is the mean of the per-image losses."""
    images, captions = loader.next_images(batch_size)  # (3, H, W) in [-1, 1]
    by_size: dict[tuple[int, ...], list[int]] = {}
    for k, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(k)
    shift = float(model.scheduler.config.shift)
    losses = []
    for rows in by_size.values():
        latents = model.encode_images((torch.stack([images[k] for k in rows]) + 1.0) / 2.0, generator=None)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
        u = torch.rand(latents.shape[0], generator=generator, device=generator.device).to(latents.device)
        sigma = shift * u / (1.0 + (shift - 1.0) * u)
        cond = model.encode_prompts([captions[k] for k in rows])
        losses.append(
            flow_matching_loss(model.velocity(flow_matching_inputs(latents, noise, sigma), sigma, cond), latents, noise)
        )
    return torch.cat(losses).mean()


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


def _every(value: int | None, cfg: TrainConfig) -> int:
    """A cadence flag, None = --logging_steps (the original's default for its logging options)."""
    return value if value is not None else cfg.logging_steps


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
