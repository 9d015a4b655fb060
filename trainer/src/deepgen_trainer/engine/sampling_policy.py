"""DiffusionNFT's sampling policy for ``--atrain_nft_off_policy``: a soft-updated copy of the DiT.

The copy generates the rollouts and gives v_old in the loss; after every training step it moves
towards the trained DiT, v_old ← d·v_old + (1 − d)·v_θ, with the paper's decay schedule
(`algorithms.diffusion_nft.old_policy_decay`). The original trainer took its "old" policy from an EMA
whose update never ran (the initial DiT for the whole run) and rolled out with the current weights;
here the policy that samples is the one the loss calls old. The copy is checkpointed
(``sampling_policy.safetensors``, `state_dict`) and restored on resume (`load_state_dict`), so a
resumed run samples and computes v_old as the unbroken run would.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from deepgen_trainer.model.deepgen import DeepGen


class SamplingPolicy:
    """A frozen copy of `model`'s DiT, soft-updated towards the trained one; `velocity` runs `model`
    with it, so it can stand in for the model in `algorithms.rollout.sde_rollout`."""

    def __init__(self, model: DeepGen) -> None:
        self.model = model
        self.dit = copy.deepcopy(model.transformer).requires_grad_(False).eval()

    def velocity(
        self, latents: Tensor, sigma: float | Tensor, cond: Any, cfg_scale: float = 0.0, uncond: Any = None
    ) -> Tensor:
        """v_old (B, C, h, w) at `latents`, as `DeepGen.velocity` with this DiT; no gradient."""
        with torch.no_grad():
            return self.model.velocity(latents, sigma, cond, cfg_scale, uncond, dit=self.dit)

    @torch.no_grad()
    def soft_update(self, state: Mapping[str, Tensor], decay: float) -> None:
        """v_old ← decay·v_old + (1 − decay)·θ for every floating-point entry of the trained DiT's
        full state dict `state` (`Updater.trainable_state(is_main=True)`, on every rank)."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        own = self.dit.state_dict()
        missing = [k for k, v in own.items() if v.is_floating_point() and k not in state]
        if missing:
            raise KeyError(f"sampling policy update: the DiT state lacks {missing[:5]} ({len(missing)} keys)")
        for key, value in own.items():
            if value.is_floating_point():
                value.lerp_(state[key].to(value.device, value.dtype), 1.0 - decay)

    def state_dict(self) -> dict[str, Tensor]:
        """The copy's floating-point entries (those `soft_update` moves), in the DiT's dtype (the resume is
        exact), keyed like the DiT's state dict; for the checkpoint."""
        return {k: v for k, v in self.dit.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore entries saved by `state_dict`: ValueError, naming the first keys, when the keys or
        shapes do not match this DiT's (nothing is changed then)."""
        own = self.state_dict()
        unexpected, missing = sorted(state.keys() - own.keys()), sorted(own.keys() - state.keys())
        if unexpected or missing:
            raise ValueError(
                f"{len(unexpected)} unexpected keys {unexpected[:3]} and {len(missing)} missing keys {missing[:3]} "
                "for this DiT"
            )
        for key, value in own.items():
            if state[key].shape != value.shape:
                raise ValueError(f"{key} has shape {tuple(state[key].shape)}, this DiT's is {tuple(value.shape)}")
        for key, value in own.items():
            value.copy_(state[key])
