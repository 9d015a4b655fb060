"""Every collective of `World` runs on the process group's device: NCCL takes CUDA tensors only, so a CPU
tensor (the rewards, the advantages' statistics, the weights' checksums) must move to the rank's GPU
for the collective and back after. No GPU here: the group's device is the meta device, and
torch.distributed's collectives are replaced by stand-ins that check the device of every tensor they get
(a real gloo run of these paths is test_train.py's two-rank torchrun test)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from deepgen_trainer.algorithms.advantages import compute_advantages
from deepgen_trainer.engine.distributed import World


class Reached(Exception):
    """The collective was called with every tensor on the group's device."""


@pytest.fixture
def off_cpu_group(monkeypatch: pytest.MonkeyPatch) -> World:
    """A world of 2 whose group lives on a device that is not the CPU; its collectives raise `Reached`
    when their tensors are on that device and fail the test otherwise."""
    world = World(rank=0, world_size=2, local_rank=0, device=torch.device("meta"))

    def check(*tensors: torch.Tensor) -> None:
        for t in tensors:
            assert t.device == world.device, f"a {t.device} tensor reached a collective of a {world.device} group"
        raise Reached

    monkeypatch.setattr(dist, "all_gather", lambda parts, tensor, *a, **k: check(*parts, tensor))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: check(tensor))
    return world


def test_cpu_tensors_reach_the_collectives_on_the_group_device(off_cpu_group: World) -> None:
    with pytest.raises(Reached):
        off_cpu_group.all_gather_cat(torch.ones(2, 3))
    with pytest.raises(Reached):
        off_cpu_group.all_reduce_mean_(torch.ones(5))


def test_global_advantage_statistics_gather_on_the_group_device(off_cpu_group: World) -> None:
    # --global_adv_stats: the batch statistics of CPU rewards (float64) go through all_gather_cat.
    rewards = torch.tensor([[0.1], [0.9], [0.4], [0.6]])
    with pytest.raises(Reached):
        compute_advantages("reinforcepp", rewards, torch.ones(4, 1), 2, all_gather=off_cpu_group.all_gather_cat)


def test_results_come_back_on_the_callers_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand-ins for a world of 2 on the CPU: every rank holds the same tensor.
    world = World(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))

    def all_gather(parts: list[torch.Tensor], tensor: torch.Tensor, *a, **k) -> None:
        for part in parts:
            part.copy_(tensor)

    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: tensor.mul_(2))
    gathered = world.all_gather_cat(torch.arange(3.0).view(1, 3))
    assert gathered.tolist() == [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]
    grads = torch.arange(4.0)[::2]  # not contiguous: the collective gets a contiguous copy, the caller its values
    out = world.all_reduce_mean_(grads)
    assert out is grads
    assert grads.tolist() == [0.0, 2.0]
