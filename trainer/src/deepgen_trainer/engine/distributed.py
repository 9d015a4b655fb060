"""The process group of a `torchrun` launch: rank, world size, device, and the few collectives the
trainer needs. A plain `python -m` run is a world of one (no process group)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (picklable values; used for our own small metadata only)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (picklable values; our own small data only)."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over the ranks that report it (NaN entries skipped)."""
        if not self.distributed:
            return metrics
        gathered: list[dict[str, float]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(gathered, metrics)
        out = {}
        for key in metrics:
            values = [m[key] for m in gathered if key in m and not math.isnan(m[key])]
            out[key] = sum(values) / len(values) if values else math.nan
        return out

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise mean of `tensor` (same shape on every rank) over ranks, in place."""
        if self.distributed:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate `tensor` (same shape on every rank) over ranks along dim 0; the result is on
        `tensor`'s device (the collective itself runs on the group's, see `_on_group_device`)."""
        if not self.distributed:
            return tensor
        local = self._on_group_device(tensor)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(tensor.device)

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average `tensor` over ranks, in place (also when it lives off the group's device); returns it."""
        if not self.distributed:
            return tensor
        local = self._on_group_device(tensor)
        dist.all_reduce(local)
        local /= self.world_size
        if local is not tensor:
            tensor.copy_(local)
        return tensor

    def _on_group_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the process group's device, contiguous: NCCL takes CUDA tensors only (gloo takes
        CPU ones), so a CPU tensor (rewards, advantages' statistics, checksums) is moved to the rank's
        GPU for the collective and its result moved back by the caller."""
        return tensor.to(self.device).contiguous()


def init_world(timeout_s: float = 1800.0) -> World:
    """Join the process group `torchrun` describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):
    NCCL on GPUs, gloo on CPU. These variables are the launcher's deployment facts."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        log.info("process group ready", extra={"fields": {"backend": backend, "rank": rank, "world_size": world_size}})
    return World(rank, world_size, local_rank, device)


def close_world(world: World) -> None:
    """Leave the process group together: a rank that tears down gloo while a peer is still in its last
    collective makes that peer abort."""
    if dist.is_initialized():
        if world.distributed:
            dist.barrier()
        dist.destroy_process_group()
