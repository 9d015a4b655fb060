"""The DiT's optimizer step, with DeepSpeed ZeRO or plain PyTorch data parallelism behind one interface.

The training loop calls `backward(loss)` once per micro-batch (losses already averaged over the
passes of one optimizer step) and `step()` once per optimizer step (`--optimizer_steps_per_rollout`
per rollout batch, 1 by default); `step()` averages gradients over ranks, clips, takes one AdamW
step and one LR-schedule tick.

- `DeepSpeedUpdater`: `deepspeed.initialize` with a torch AdamW (DeepSpeed's fused Adam JIT-compiles
  for minutes on CPU) and the resolved ZeRO config; gradient accumulation is DeepSpeed's, with
  `gradient_accumulation_steps` equal to the backward passes of one optimizer step, so its update
  lands on that step's last backward and `step()` only checks that it did.
- `TorchUpdater` (``--deepspeed none``): gradients accumulate locally and are averaged over ranks with
  one all-reduce per step (DDP would all-reduce after every backward unless told not to; the loop
  does ~30 backward passes per step).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import get_scheduler

from deepgen_trainer.checkpoints.folder_files import load_checkpoint_file
from deepgen_trainer.checkpoints.run_checkpoint import Checkpoint
from deepgen_trainer.config import TrainConfig
from deepgen_trainer.engine.distributed import World

log = logging.getLogger(__name__)

_DEEPSPEED_TAG = "state"


class Updater(Protocol):
    def backward(self, loss: Tensor) -> None: ...

    def backward_small(self, loss: Tensor) -> None:
        """Backpropagate a small loss term (λ·L_sft) on its own, before the pass's `backward`, into the
        same optimizer step: added to a large term before one backward, its gradient would be rounded
        away in the bf16 sum (λ = 1e-4 is below bf16's 2⁻⁸ relative precision)."""

    def step(self) -> float:
        """Average gradients over ranks, clip, step; returns the gradient norm before clipping."""

    @property
    def lr(self) -> float: ...

    @property
    def optimizer_steps(self) -> int: ...

    def trainable_state(self, is_main: bool) -> dict[str, Tensor] | None:
        """The DiT's full state dict on the main rank (None elsewhere); called on every rank."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Keyword arguments of `save_checkpoint` for the optimizer and LR schedule."""

    def restore(self, checkpoint: Checkpoint) -> None:
        """The DiT's weights, the optimizer and the LR schedule from a checkpoint."""


def build_updater(dit: nn.Module, cfg: TrainConfig, world: World, total_steps: int) -> Updater:
    params = [p for p in dit.parameters() if p.requires_grad]
    # --deepspeed none: AdamW steps float32 master copies of bf16 weights (DeepSpeed keeps its own).
    masters = master_weights(params) if cfg.deepspeed == "none" else params
    # AdamW as DESIGN §4: β (0.9, 0.999), eps 1e-8, no weight decay. Fused on CUDA: one kernel over all
    # tensors, without the foreach implementation's temporaries (~8 GiB at the DiT's size).
    optimizer = torch.optim.AdamW(
        masters, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
        fused=world.device.type == "cuda" and not _offloads_optimizer(cfg),
    )  # fmt: skip
    # The schedule ticks once per optimizer step (once per backward with --step_per_backward, as in the
    # reference); --warmup_steps counts rollout steps.
    per_step = cfg.optimizer_steps(world.world_size)
    ticks, warmup = total_steps * per_step, cfg.warmup_steps * per_step

    def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return get_scheduler(
            cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=max(ticks, 1),
            scheduler_specific_kwargs=json.loads(cfg.lr_scheduler_kwargs) if cfg.lr_scheduler_kwargs else None,
        )  # fmt: skip

    if cfg.deepspeed == "none":
        return TorchUpdater(dit, params, masters, optimizer, schedule(optimizer), world, cfg.max_grad_norm)
    return DeepSpeedUpdater(dit, optimizer, schedule, cfg, world)


def master_weights(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """float32 copies of `params` that are not float32 (the parameters themselves when all are): torch
    AdamW on bf16 weights loses every update below half a bf16 step of the weight (bf16(0.02) + 2e-6 ==
    0.02 at the default lr 2e-6), so the optimizer steps the copies and the model gets them rounded."""
    if all(p.dtype == torch.float32 for p in params):
        return params
    return [nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in params]


def _offloads_optimizer(cfg: TrainConfig) -> bool:
    """The DeepSpeed config keeps the optimizer on the CPU (fused AdamW is for the GPU's tensors)."""
    if cfg.deepspeed == "none":
        return False
    from deepgen_trainer.engine.ds_config import deepspeed_config

    return "offload_optimizer" in deepspeed_config(cfg.deepspeed, cfg).get("zero_optimization", {})


class TorchUpdater:
    """Plain data parallelism. `params` are the DiT's trainable parameters; `masters` what the optimizer
    steps: the same list in float32 training, float32 copies of bf16 parameters otherwise. With copies,
    every backward moves the bf16 gradients into the copies' float32 gradients (accumulation over the
    step's ~30 backward passes in float32), and each step writes the copies back, rounded to bf16."""

    def __init__(
        self,
        dit: nn.Module,
        params: list[nn.Parameter],
        masters: list[nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        world: World,
        max_grad_norm: float,
    ) -> None:
        self.dit = dit
        self.params = params
        self.masters = masters
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.world = world
        self.max_grad_norm = max_grad_norm
        self._steps = 0
        by_id = {id(p): m for p, m in zip(params, masters, strict=True)}
        self._master_of = {name: by_id[id(p)] for name, p in dit.named_parameters() if id(p) in by_id}

    def backward(self, loss: Tensor) -> None:
        loss.backward()
        if self.masters is self.params:
            return
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                if p.grad is not None:
                    if m.grad is None:
                        m.grad = p.grad.to(torch.float32)
                    else:
                        m.grad.add_(p.grad)
                    p.grad = None

    def backward_small(self, loss: Tensor) -> None:
        # Its own backward; the accumulation is float32 (the masters' gradients, or fp32 parameters').
        self.backward(loss)

    def step(self) -> float:
        grads = [m.grad for m in self.masters if m.grad is not None]
        if self.world.distributed and grads:
            flat = self.world.all_reduce_mean_(torch.cat([g.reshape(-1) for g in grads]))
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        # clip_grad_norm_ computes the norm anyway; with clipping off an infinite bound returns it untouched.
        norm = torch.nn.utils.clip_grad_norm_(self.masters, self.max_grad_norm or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._write_back()
        self._steps += 1
        return float(norm)

    def _write_back(self) -> None:
        if self.masters is not self.params:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters, strict=True):
                    p.copy_(m)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def optimizer_steps(self) -> int:
        return self._steps

    def trainable_state(self, is_main: bool) -> dict[str, Tensor] | None:
        """The DiT's state dict with the float32 masters in place of bf16 trainable weights (what a
        resume must continue from, and what the EMA averages)."""
        if not is_main:
            return None
        state = self.dit.state_dict()
        if self.masters is not self.params:
            state |= {name: m.detach() for name, m in self._master_of.items()}
        return state

    def checkpoint_state(self) -> dict[str, Any]:
        return {"optimizer_state": self.optimizer.state_dict(), "scheduler_state": self.scheduler.state_dict()}

    def restore(self, checkpoint: Checkpoint) -> None:
        if checkpoint.optimizer_state is None or checkpoint.scheduler_state is None:
            raise ValueError(f"{checkpoint.path} has no optimizer/scheduler state to resume from")
        self.dit.load_state_dict(checkpoint.trainable)
        if self.masters is not self.params:
            with torch.no_grad():
                for name, m in self._master_of.items():
                    m.copy_(checkpoint.trainable[name])
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.scheduler.load_state_dict(checkpoint.scheduler_state)
        self._steps = self.scheduler.last_epoch  # one schedule tick per optimizer step


def init_single_process_group(device: torch.device) -> None:
    """A process group of one, which DeepSpeed needs. Under `torchrun` (one rank) it joins the launcher's
    rendezvous: there a `tcp://` rendezvous of our own would wait forever, since torchrun makes ranks
    use its agent's store (TORCHELASTIC_USE_AGENT_STORE) instead of starting one. Without `torchrun`
    this stands in for the launcher, including the LOCAL_RANK variable DeepSpeed insists on."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        dist.init_process_group(backend)  # env://: MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE from torchrun
        return
    with socket.socket() as s:  # a free local port for the rendezvous of a world of one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


class DeepSpeedUpdater:
    def __init__(
        self,
        dit: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
        cfg: TrainConfig,
        world: World,
    ) -> None:
        import deepspeed  # heavy import, only when DeepSpeed is used

        if world.device.type == "cpu":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (~70 s of C++ build)
            # that only inference kernels use; training reduces through torch.distributed (gloo).
            # (`deepspeed.comm.torch` the attribute is the torch package: fetch the module itself.)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

        from deepgen_trainer.engine.ds_config import deepspeed_config

        config = deepspeed_config(
            cfg.deepspeed, cfg, world.world_size, hidden_size=_hidden_size(dit), cpu=world.device.type == "cpu"
        )
        if not dist.is_initialized():  # DeepSpeed needs a process group, also for a single process
            init_single_process_group(world.device)
        # An 'optimizer' block (the original's zero2 / zero3_offload JSONs): DeepSpeed builds the optimizer
        # from the config, and the schedule is built on it; otherwise it gets the torch AdamW.
        builds_optimizer = "optimizer" in config
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=dit,
            optimizer=None if builds_optimizer else optimizer,
            model_parameters=[p for p in dit.parameters() if p.requires_grad] if builds_optimizer else None,
            lr_scheduler=schedule if builds_optimizer else schedule(optimizer),
            config=config,
            dist_init_required=False,
        )
        self._steps = 0
        self._held: Tensor | None = None  # a small term waiting for the next backward (see backward_small)

    def backward(self, loss: Tensor) -> None:
        # The loop already divides each loss by the passes of the step. DeepSpeed counts micro-steps in
        # engine.step(), which reduces, clips and updates only at the accumulation boundary.
        if self._held is not None:
            loss, self._held = loss + self._held, None
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def backward_small(self, loss: Tensor) -> None:
        model_dtype, accumulation_dtype = self.engine.get_data_types()
        if model_dtype != accumulation_dtype:
            # bf16 weights, float32 accumulation (`data_types.grad_accum_dtype`): a second backward within
            # the micro-step adds its gradient into the float32 partitions.
            self.engine.backward(loss, scale_wrt_gas=False)
        else:
            # One dtype: ZeRO-2 keeps only the last backward of a micro-step (measured with DeepSpeed
            # 0.19.8; with float32 accumulation ZeRO-2 and ZeRO-3 keep both), so the term joins the next
            # backward; in float32 the sum loses nothing.
            self._held = loss if self._held is None else self._held + loss

    def step(self) -> float:
        if self.engine.global_steps != self._steps + 1:
            raise RuntimeError(
                f"DeepSpeed took {self.engine.global_steps - self._steps} optimizer steps in this training step: the "
                "backward passes per step do not match gradient_accumulation_steps of the DeepSpeed config"
            )
        self._steps += 1
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    @property
    def optimizer_steps(self) -> int:
        return self._steps

    def trainable_state(self, is_main: bool) -> dict[str, Tensor] | None:
        module = self.engine.module
        if self.engine.zero_optimization_stage() < 3:
            return module.state_dict() if is_main else None
        import deepspeed

        # ZeRO-3 partitions the weights over the ranks: gather them (a collective) to save them whole.
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in module.state_dict().items()} if is_main else None

    def checkpoint_state(self) -> dict[str, Any]:
        save: Callable[[Path], None] = lambda d: self.engine.save_checkpoint(str(d), tag=_DEEPSPEED_TAG)  # noqa: E731
        return {"deepspeed_save": save}

    def restore(self, checkpoint: Checkpoint) -> None:
        if checkpoint.deepspeed_dir is None:
            raise ValueError(f"{checkpoint.path} was not written by DeepSpeed; resume it with the same --deepspeed")
        # DeepSpeed's own state holds the (possibly partitioned) weights, the optimizer and the schedule.
        # Its checkpoint engine unpickles them with torch's full (code-running) loader: read them with the safe
        # loader instead, confined to the checkpoint's deepspeed/ folder.
        root = checkpoint.deepspeed_dir
        engine_files = self.engine.checkpoint_engine
        engine_files.load = lambda path, map_location=None: load_checkpoint_file(
            root, Path(path), map_location, allow_foreign=True
        )
        try:
            self.engine.load_checkpoint(str(root), tag=_DEEPSPEED_TAG, load_module_strict=True)
        finally:
            del engine_files.load  # the class's own method again
        self._steps = self.engine.global_steps


def _hidden_size(dit: nn.Module) -> int | None:
    """The DiT's hidden size (heads × head dim of an SD3 transformer), for ZeRO-3's "auto" bucket sizes."""
    config = getattr(dit, "config", None)
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "attention_head_dim", None)
    return heads * head_dim if heads and head_dim else None
