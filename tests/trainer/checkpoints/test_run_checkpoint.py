"""deepgen_trainer.checkpoints.run_checkpoint: round trips, exact RNG resume, atomicity under crashes, retention,
ranks."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

from deepgen_trainer.checkpoints import run_checkpoint as ckpt_mod
from deepgen_trainer.checkpoints.rng_state import apply_rng, capture_rng
from deepgen_trainer.checkpoints.run_checkpoint import (
    COMPLETE_MARKER,
    DEEPGEN_ONLY_FILE,
    EMA_FILE,
    SAMPLING_POLICY_FILE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from tests.trainer.tiny_dit import tiny_dit


def dit_loss(model: SD3Transformer2DModel, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = model(
        hidden_states=torch.randn(2, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 3, 16, generator=g),
        pooled_projections=torch.randn(2, 16, generator=g),
        timestep=torch.tensor([10.0, 500.0]),
    ).sample
    return out.square().mean()


def make_training_state(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """A tiny DiT after one AdamW step with a warm-up LambdaLR, so every state is non-trivial."""
    torch.manual_seed(seed)
    model = tiny_dit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    dit_loss(model, seed).backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return model, opt, sched


def save_simple(output_dir: Path, step: int, weight: float = 0.0, **kw: object) -> Path:
    return save_checkpoint(output_dir, step, trainable={"w": torch.full((3,), weight)}, **kw)


def test_round_trip_weights_optimizer_scheduler_config(tmp_path: Path):
    model, opt, sched = make_training_state()
    config = {"lr": 1e-3, "sampler": {"name": "cps_sde", "eta": 0.7}, "rewards": ["ocr", "unified"]}
    path = save_checkpoint(
        tmp_path,
        7,
        trainable=model.state_dict(),
        optimizer_state=opt.state_dict(),
        scheduler_state=sched.state_dict(),
        sampler_state={"epoch": 1, "index": 42},
        config=config,
        metadata={"reward_mean": 0.5},
    )
    assert path == tmp_path / "checkpoint-7"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [
            "transformer.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "config.json",
            "meta.json",
            "rng_rank0.pt",
            "sampler_rank0.json",
            COMPLETE_MARKER,
        ]
    )
    ckpt = load_checkpoint(path)
    assert (ckpt.step, ckpt.world_size, ckpt.deepspeed_dir) == (7, 1, None)
    assert ckpt.config == config
    assert ckpt.metadata == {"reward_mean": 0.5}
    assert ckpt.sampler_state == {"epoch": 1, "index": 42}
    assert_close(ckpt.trainable, model.state_dict(), rtol=0, atol=0)

    # Resume into fresh objects: the next step must match the uninterrupted run bit for bit.
    model2, opt2, sched2 = make_training_state(seed=123)
    model2.load_state_dict(ckpt.trainable)
    opt2.load_state_dict(ckpt.optimizer_state)
    sched2.load_state_dict(ckpt.scheduler_state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        dit_loss(m, seed=5).backward()
        o.step()
        s.step()
    assert_close(model2.state_dict(), model.state_dict(), rtol=0, atol=0)
    assert_close(opt2.state_dict()["state"], opt.state_dict()["state"], rtol=0, atol=0)
    assert sched2.get_last_lr() == sched.get_last_lr()


def draw_all(n: int = 5) -> tuple[list[float], list[float], torch.Tensor]:
    return [random.random() for _ in range(n)], np.random.rand(n).tolist(), torch.rand(n)


def test_rng_streams_continue_exactly_after_restore(tmp_path: Path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw_all()
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    save_simple(tmp_path, 1)  # rng=None: captured at save time
    expected = draw_all()
    apply_rng(load_checkpoint(tmp_path / "checkpoint-1").rng)
    got = draw_all()
    assert got[0] == expected[0]
    assert got[1] == expected[1]
    assert_close(got[2], expected[2], rtol=0, atol=0)


def test_explicit_rng_state_is_saved_as_given(tmp_path: Path):
    torch.manual_seed(0)
    state = capture_rng()
    expected = torch.rand(4)
    torch.manual_seed(99)
    save_simple(tmp_path, 1, rng=state)
    apply_rng(load_checkpoint(tmp_path / "checkpoint-1").rng)
    assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    save_simple(tmp_path, 10, weight=1.0, optimizer_state={"state": {}, "param_groups": []})
    real_write = ckpt_mod._write_torch

    def failing_write(path: Path, obj: object) -> None:
        if path.name == "optimizer.pt":
            raise OSError("disk full")
        real_write(path, obj)

    monkeypatch.setattr(ckpt_mod, "_write_torch", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_simple(tmp_path, 20, weight=2.0, optimizer_state={"state": {}, "param_groups": []})
    stale = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(stale) == 1
    assert stale[0].startswith("checkpoint-20.tmp-")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoint-10"

    removed = prune_checkpoints(tmp_path, keep=3)
    assert [p.name for p in removed] == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]
    assert_close(load_checkpoint(tmp_path / "checkpoint-10").trainable["w"], torch.full((3,), 1.0))


@pytest.mark.integration
def test_process_killed_before_the_rename_leaves_no_checkpoint(tmp_path: Path):
    """A real crash (SIGKILL, no cleanup runs) after every file and the marker are in the staging dir."""
    save_simple(tmp_path, 1)
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from deepgen_trainer.checkpoints import run_checkpoint as c
        c._fsync_dir = lambda path: os.kill(os.getpid(), signal.SIGKILL)  # first call: just before the rename
        c.save_checkpoint({str(tmp_path)!r}, 2, trainable={{"w": torch.ones(3)}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoint-2.tmp-")]
    assert (staging / COMPLETE_MARKER).is_file()  # complete content, but never committed
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


def test_incomplete_checkpoint_dir_is_ignored_and_rejected(tmp_path: Path):
    save_simple(tmp_path / "run", 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    tmp_path = tmp_path / "run"
    half = tmp_path / "checkpoint-5"
    half.mkdir()
    (half / "transformer.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    with pytest.raises(CheckpointError, match=r"checkpoint-5.*complete"):
        load_checkpoint(half)
    with pytest.raises(CheckpointError, match=r"checkpoint-5 is incomplete"):
        resolve_checkpoint(half)
    with pytest.raises(FileNotFoundError, match="checkpoint-9"):
        load_checkpoint(tmp_path / "checkpoint-9")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(empty)
    prune_checkpoints(tmp_path, keep=1)
    assert half.is_dir()  # not written by save_checkpoint: left alone


def test_latest_of_missing_dir_is_none(tmp_path: Path):
    assert latest_checkpoint(tmp_path / "nope") is None
    assert prune_checkpoints(tmp_path / "nope", keep=1) == []


def test_saving_the_same_step_twice_replaces_it(tmp_path: Path):
    save_simple(tmp_path, 3, weight=1.0, sampler_state={"index": 1})
    save_simple(tmp_path, 3, weight=2.0, sampler_state={"index": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    ckpt = load_checkpoint(tmp_path / "checkpoint-3")
    assert_close(ckpt.trainable["w"], torch.full((3,), 2.0))
    assert ckpt.sampler_state == {"index": 2}


def test_retention_keeps_the_newest(tmp_path: Path):
    for step in (5, 10, 100, 20, 50):  # numeric order, not string order
        save_simple(tmp_path, step, weight=float(step))
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-10", "checkpoint-20", "checkpoint-5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-100", "checkpoint-50"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-100"
    assert prune_checkpoints(tmp_path, keep=2) == []
    with pytest.raises(ValueError, match="keep=0"):
        prune_checkpoints(tmp_path, keep=0)


def test_two_ranks_each_write_their_rng_and_sampler_state(tmp_path: Path):
    """Two ranks as threads with a real barrier; rank 1 passes no weights (rank 0 writes those)."""
    barrier = threading.Barrier(2, timeout=60)
    rngs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        rngs.append(capture_rng())

    def rank_main(rank: int) -> Path:
        return save_checkpoint(
            tmp_path,
            4,
            trainable={"w": torch.zeros(2)} if rank == 0 else None,
            rng=rngs[rank],
            sampler_state={"rank": rank, "index": 10 + rank},
            config={"world_size": 2} if rank == 0 else None,
            rank=rank,
            world_size=2,
            barrier=barrier.wait,
        )

    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(rank_main, [0, 1]))
    assert paths == [tmp_path / "checkpoint-4"] * 2
    path = paths[0]
    assert {"rng_rank0.pt", "rng_rank1.pt", "sampler_rank0.json", "sampler_rank1.json"} <= {
        p.name for p in path.iterdir()
    }
    for rank in (0, 1):
        ckpt = load_checkpoint(path, rank=rank)
        assert ckpt.world_size == 2
        assert ckpt.sampler_state == {"rank": rank, "index": 10 + rank}
        assert_close(ckpt.rng["torch"], rngs[rank]["torch"], rtol=0, atol=0)
    # Resuming with a larger world: the new rank gets no state rather than another rank's.
    ckpt = load_checkpoint(path, rank=2)
    assert ckpt.rng is None
    assert ckpt.sampler_state is None


def test_multi_rank_needs_a_barrier_and_a_valid_rank(tmp_path: Path):
    with pytest.raises(ValueError, match="barrier"):
        save_simple(tmp_path, 1, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank=2"):
        save_simple(tmp_path, 1, rank=2, world_size=2, barrier=lambda: None)
    with pytest.raises(ValueError, match="rank 0 must pass trainable"):
        save_checkpoint(tmp_path, 1, trainable=None)


def test_deepspeed_hook_writes_into_the_checkpoint(tmp_path: Path):
    """Stand-in for ``engine.save_checkpoint``: a real DeepSpeed engine needs an accelerator and a
    process group; the contract tested is the directory the hook gets and what load reports."""
    seen: list[Path] = []

    def fake_engine_save(directory: Path) -> None:
        seen.append(directory)
        (directory / "state").mkdir(parents=True)
        (directory / "state" / "mp_rank_00_model_states.pt").write_bytes(b"x")

    path = save_simple(tmp_path, 6, deepspeed_save=fake_engine_save)
    assert seen[0].parent.name.startswith("checkpoint-6.tmp-")  # written before the commit
    ckpt = load_checkpoint(path)
    assert ckpt.deepspeed_dir == path / "deepspeed"
    assert (ckpt.deepspeed_dir / "state" / "mp_rank_00_model_states.pt").is_file()


class Opaque:
    """Pickles as a reference to this module's class: loading it needs the full unpickler."""


def test_states_that_need_unpickling_are_refused_before_writing(tmp_path: Path):
    with pytest.raises(TypeError, match=r"optimizer_state\['param_groups'\]\[0\]\['fn'\].*Opaque"):
        save_simple(tmp_path, 1, optimizer_state={"param_groups": [{"fn": Opaque()}]})
    with pytest.raises(TypeError, match=r"scheduler_state\['counts'\].*defaultdict"):
        save_simple(tmp_path, 1, scheduler_state={"counts": defaultdict(int)})
    with pytest.raises(TypeError, match="sampler_state must be JSON-serialisable"):
        save_simple(tmp_path, 1, sampler_state={"indices": torch.arange(3)})
    assert not any(tmp_path.iterdir())


def test_a_pickled_object_in_a_checkpoint_is_not_loaded(tmp_path: Path):
    path = save_simple(tmp_path, 1, optimizer_state={"state": {}})
    torch.save({"state": {}, "evil": Opaque()}, path / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: refused: the file names the class .*Opaque"):
        load_checkpoint(path)


OPTIONAL_WEIGHTS = {DEEPGEN_ONLY_FILE: "deepgen_only", EMA_FILE: "ema", SAMPLING_POLICY_FILE: "sampling_policy"}


@pytest.mark.parametrize("file", list(OPTIONAL_WEIGHTS))
def test_optional_weight_files_round_trip_and_may_not_point_outside(tmp_path: Path, file: str):
    field = OPTIONAL_WEIGHTS[file]
    weights = {"w": torch.arange(3.0)}
    path = save_simple(tmp_path / "run", 1, **{field: weights})
    ckpt = load_checkpoint(path)
    assert_close(getattr(ckpt, field), weights, rtol=0, atol=0)
    assert [getattr(ckpt, f) for f in OPTIONAL_WEIGHTS.values() if f != field] == [None, None]  # absent: None
    save_file({"w": torch.ones(3)}, tmp_path / "secret.safetensors")
    (path / file).unlink()
    (path / file).symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(CheckpointError, match=rf"{file} points outside"):
        load_checkpoint(path)


def test_multistep_scheduler_state_with_a_counter_round_trips(tmp_path: Path):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4, 4], gamma=0.5)
    path = save_simple(tmp_path, 1, scheduler_state=sched.state_dict())
    assert load_checkpoint(path).scheduler_state == sched.state_dict()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rng_and_map_location(tmp_path: Path):
    torch.cuda.manual_seed_all(7)
    path = save_simple(tmp_path, 1)
    expected = torch.rand(4, device="cuda")
    ckpt = load_checkpoint(path, map_location="cuda")
    assert ckpt.trainable["w"].device.type == "cuda"
    apply_rng(ckpt.rng)
    assert_close(torch.rand(4, device="cuda"), expected, rtol=0, atol=0)
