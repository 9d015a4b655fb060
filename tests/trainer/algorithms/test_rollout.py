"""`algorithms/rollout.py`: an SDE rollout keeps the step means GRPO-Guard's RatioNorm needs, equal to
the means the update recomputes for the stored transitions (so the first ratio is exactly 1)."""

from __future__ import annotations

import torch

from deepgen_trainer.algorithms.rollout import sde_rollout
from deepgen_trainer.algorithms.sde import sde_step_with_logprob
from deepgen_trainer.model.tiny import build_tiny


def test_kept_means_are_the_updates_means_of_those_steps() -> None:
    model = build_tiny()
    cond = model.encode_prompts(["a red cube", "a cat"])
    sigmas = model.sigmas(4)
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    keep = [2, 0]
    g = torch.Generator().manual_seed(1)
    traj = sde_rollout(model, noise, cond, sigmas, "flowgrpo_sde", 1.0, generator=g, keep_means=keep)
    assert traj.means is not None
    assert traj.means.shape == (2, 2, 4, 4, 4)
    assert traj.means.dtype == torch.float32
    for k, j in enumerate(keep):
        v = model.velocity(traj.latents[j], sigmas[j].item(), cond)
        _, log_prob, mean, _ = sde_step_with_logprob(
            "flowgrpo_sde", v, traj.latents[j], sigmas[j].item(), sigmas[j + 1].item(), 1.0,
            prev_sample=traj.latents[j + 1],
        )  # fmt: skip
        assert torch.equal(mean, traj.means[k])
        assert torch.equal(log_prob, traj.log_probs[j])
    assert sde_rollout(model, noise, cond, sigmas, "cps_sde", 1.0, generator=g).means is None
