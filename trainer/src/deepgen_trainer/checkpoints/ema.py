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

import threading
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
    other entries (integer buffers) are not averaged.

    From CUDA tensors an update costs the training one device-to-host copy, on a side stream into pinned
    buffers (the compute stream waits for it, no host sync), and the lerp runs in a thread on the CPU
    while the next rollout generates; `state_dict`, `load_state_dict` and the next `update` wait for it."""

    def __init__(self, state: Mapping[str, Tensor], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in (0, 1) (0.999 averages over ~1000 steps)")
        self.decay = decay
        self.shadow = {
            k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items() if v.is_floating_point()
        }
        self._staging: dict[str, Tensor] = {}  # pinned host copies of the CUDA state
        self._stream: torch.cuda.Stream | None = None
        self._lerp: threading.Thread | None = None
        self._error: BaseException | None = None

    @torch.no_grad()
    def update(self, state: Mapping[str, Tensor]) -> None:
        """One EMA step towards `state` (the DiT's current state dict, full tensors)."""
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise KeyError(f"EMA update: the DiT state lacks {sorted(missing)[:5]} ({len(missing)} keys)")
        self.wait()
        if not any(state[k].is_cuda for k in self.shadow):
            self._lerp_towards({k: state[k].detach() for k in self.shadow})
            return
        copied = self._copy_to_host(state)
        self._lerp = threading.Thread(target=self._lerp_after, args=(copied,), name="dit-ema", daemon=True)
        self._lerp.start()

    def _copy_to_host(self, state: Mapping[str, Tensor]) -> torch.cuda.Event:
        device = next(state[k].device for k in self.shadow if state[k].is_cuda)
        compute = torch.cuda.current_stream(device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(compute)  # the weights as the optimizer step left them
        with torch.cuda.stream(self._stream):
            for key in self.shadow:
                source = state[key].detach()
                staging = self._staging.get(key)
                if staging is None or staging.dtype != source.dtype:
                    staging = self._staging[key] = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
                staging.copy_(source, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(self._stream)
        compute.wait_event(copied)  # no later kernel (the next optimizer step) writes them before the copy
        return copied

    def _lerp_after(self, copied: torch.cuda.Event) -> None:
        try:
            copied.synchronize()
            self._lerp_towards(self._staging)
        except BaseException as exc:  # re-raised in the training thread by `wait`
            self._error = exc

    def _lerp_towards(self, state: Mapping[str, Tensor]) -> None:
        for key, avg in self.shadow.items():
            avg.lerp_(state[key].to(torch.float32), 1.0 - self.decay)

    def wait(self) -> None:
        """Until the last update's average is complete."""
        if self._lerp is not None:
            self._lerp.join()
            self._lerp = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("the EMA update failed") from error

    def state_dict(self) -> dict[str, Tensor]:
        """The averages (float32), keyed like the DiT's state dict."""
        self.wait()
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore averages saved by `state_dict`; the keys and shapes must match the DiT's."""
        self.wait()
        if state.keys() != self.shadow.keys():
            raise ValueError(
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
