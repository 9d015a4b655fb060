"""Step 1, the rollout: the step's prompts, `rollout_n` SDE trajectories per prompt from the step's seed,
and each decoded generation micro-batch sent to the reward models at once, so scoring overlaps the next
micro-batch's generation."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from deepgen_trainer.algorithms.rollout import sde_rollout
from deepgen_trainer.config import TrainConfig
from deepgen_trainer.model.deepgen import Conditioning, DeepGen, to_uint8
from deepgen_trainer.rewards.scorer import RewardBatch
from deepgen_trainer.run import Run


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
    g = torch.Generator(world.device).manual_seed(step_seed(cfg.seed, step, world.rank))
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


def trained_steps(cfg: TrainConfig, step: int) -> list[int]:
    """The step's `num_train_timesteps` SDE step indices (never the last), drawn from the run seed and
    the step alone: every rank, and the rollout that keeps GRPO-Guard's μ_old, draws the same."""
    g = torch.Generator().manual_seed(step_seed(cfg.seed, step, 0))
    return torch.randperm(cfg.num_inference_steps - 1, generator=g)[: cfg.num_train_timesteps].tolist()


def step_seed(seed: int, step: int, rank: int) -> int:
    """A distinct seed per (run seed, step, rank): a resumed run draws the same noise as an unbroken one."""
    return (seed * 1_000_003 + step * 10_007 + rank) % (2**63)
