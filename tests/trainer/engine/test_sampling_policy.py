"""DiffusionNFT's sampling policy (`engine/sampling_policy.py`): a frozen copy of the DiT that the
rollout and v_old run, soft-updated towards the trained DiT."""

from __future__ import annotations

import pytest
import torch

from deepgen_trainer.algorithms.diffusion_nft import old_policy_decay
from deepgen_trainer.engine.sampling_policy import SamplingPolicy
from deepgen_trainer.model.tiny import build_tiny


def test_copy_samples_with_its_own_weights_and_follows_the_trained_dit() -> None:
    model = build_tiny()
    policy = SamplingPolicy(model)
    x = torch.randn(2, 4, 4, 4)
    cond = model.encode_prompts(["a", "b"])
    assert torch.equal(policy.velocity(x, 0.5, cond), model.velocity(x, 0.5, cond))
    start = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    with torch.no_grad():  # a training step moves the DiT
        for p in model.transformer.parameters():
            p.add_(0.1)
    assert not torch.equal(policy.velocity(x, 0.5, cond), model.velocity(x, 0.5, cond))  # the copy did not move
    assert not any(p.requires_grad for p in policy.dit.parameters())

    trained = model.transformer.state_dict()
    decay = old_policy_decay(500, 1)  # 0.5: halfway
    policy.soft_update(trained, decay)
    for key, value in policy.dit.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.5 * start[key] + 0.5 * trained[key])
    policy.soft_update(trained, 0.0)  # d = 0: the copy is the trained DiT
    assert torch.equal(policy.velocity(x, 0.5, cond), model.velocity(x, 0.5, cond))
    assert policy.decay == 0.0
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        policy.soft_update(trained, 1.0)
    with pytest.raises(KeyError, match="lacks"):
        policy.soft_update({}, 0.5)
