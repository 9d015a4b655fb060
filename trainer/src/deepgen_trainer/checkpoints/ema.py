"""Exponential moving average of the DiT's weights (``--ema_decay``).

After every optimizer step ``ema ← decay·ema + (1 − decay)·θ`` for every floating-point entry of the
DiT's state dict, kept in float32 whatever the training dtype (a bf16 average would round away
updates smaller than 2⁻⁸ of a weight, i.e. most of them at decay 0.999). No warm-up: the average
starts at the initial DiT, so `decay` alone says how far back it looks (≈ 1/(1 − decay) steps).
The original's ``--ema_diffusion`` kept a warm-up ``min((1 + t)/(10 + t), decay)`` but never called
its update; here the update runs and the average is checkpointed, restored on resume, written by
``convert --ema`` and used for evaluation with ``--eval_with_ema``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor

from deepgen_trainer.model.deepgen import DeepGen
from deepgen_trainer.model.joint_attention import MaskedJointAttnProcessor


class DitEma:
    """EMA of a state dict. `shadow` maps each floating-point key to its float32 average, on the CPU
    (like the original's: a float32 copy of a 2.5 B-parameter DiT is 10 GB the GPU need not hold);
    other entries (integer buffers) are not averaged."""

    def __init__(self, state: Mapping[str, Tensor], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in (0, 1) (0.999 averages over ~1000 steps)")
        self.decay = decay
        self.shadow = {
            k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items() if v.is_floating_point()
        }

    @torch.no_grad()
    def update(self, state: Mapping[str, Tensor]) -> None:
        """One EMA step towards `state` (the DiT's current state dict, full tensors)."""
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise KeyError(f"EMA update: the DiT state lacks {sorted(missing)[:5]} ({len(missing)} keys)")
        for key, avg in self.shadow.items():
            avg.lerp_(state[key].detach().to(avg.device, torch.float32), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        """The averages (float32), keyed like the DiT's state dict."""
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore averages saved by `state_dict`; the keys and shapes must match the DiT's."""
        if state.keys() != self.shadow.keys():
            raise KeyError(
                f"EMA state does not match the DiT: {len(state.keys() - self.shadow.keys())} unexpected and "
                f"{len(self.shadow.keys() - state.keys())} missing keys"
            )
        for key, avg in self.shadow.items():
            if state[key].shape != avg.shape:
                raise ValueError(f"EMA state {key}: shape {tuple(state[key].shape)} vs DiT {tuple(avg.shape)}")
            avg.copy_(state[key])


@contextmanager
def ema_dit(model: DeepGen, ema: DitEma) -> Iterator[None]:
    """Run `model` with a DiT holding the EMA weights (a fresh module of the same config and dtype,
    so a DeepSpeed-wrapped or ZeRO-3-partitioned training DiT is left untouched); the training DiT is
    put back on exit."""
    live = model.transformer
    # Built on the meta device and given the EMA's tensors (assign): no random init of a 2 B-parameter DiT
    # on the GPU before its weights are replaced anyway.
    with torch.device("meta"):
        dit = SD3Transformer2DModel.from_config(live.config)
    state = {k: v.to(model.device, live.dtype) for k, v in ema.state_dict().items()}
    live_state = live.state_dict()
    for key in dit.state_dict().keys() - state.keys():  # entries the EMA does not average (integer buffers)
        if key in live_state and not live_state[key].is_floating_point():
            state[key] = live_state[key]
    missing, unexpected = dit.load_state_dict(state, strict=False, assign=True)
    if unexpected or missing:
        raise KeyError(f"EMA state does not fit the DiT: missing {missing[:5]}, unexpected {unexpected[:5]}")
    live_buffers = dict(live.named_buffers())
    for name, buffer in list(dit.named_buffers()):  # non-persistent buffers (not in any state dict)
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            dit.get_submodule(owner).register_buffer(attr, live_buffers[name].clone(), persistent=False)
    dit.set_attn_processor(MaskedJointAttnProcessor())
    model.transformer = dit.eval().requires_grad_(False)
    try:
        yield
    finally:
        model.transformer = live
