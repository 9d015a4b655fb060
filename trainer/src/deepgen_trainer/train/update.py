"""Steps 4-6, the policy update: the `--atrain_algorithm` loss (+ β·KL) on the trained SDE steps of the
rollout, the SFT auxiliary loss, and `--optimizer_steps_per_rollout` optimizer steps, each followed by
the EMA's; then the DiffusionNFT sampling copy follows the trained DiT."""

from __future__ import annotations

import math

import torch

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
from deepgen_trainer.algorithms.sde import sde_step_with_logprob
from deepgen_trainer.data.sftaux import SftAuxLoader
from deepgen_trainer.model.deepgen import Conditioning, DeepGen
from deepgen_trainer.observe.grad_norms import GradParts
from deepgen_trainer.run import Run
from deepgen_trainer.train.rollout import Rollout, trained_steps


class PassStats:
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


def update_policy(run: Run, rollout: Rollout, advantages: torch.Tensor, step: int) -> tuple[PassStats, float]:
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
    grpo_scale = (1.0 - (cfg.sftaux_coef if run.sftaux is not None else 0.0)) / per_step
    stats = PassStats()
    grad_norm = math.nan
    parts = run.grad_parts if run.grad_parts is not None and cfg.due(cfg.log_component_grad_norm_every, step) else None
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


def ratio_pass(
    run: Run, rollout: Rollout, advantages: torch.Tensor, j: int, sl: slice, stats: PassStats
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
    run: Run, rollout: Rollout, r: torch.Tensor, j: int, sl: slice, stats: PassStats
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
