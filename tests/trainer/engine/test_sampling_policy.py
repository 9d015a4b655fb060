"""DiffusionNFT's sampling policy (`engine/sampling_policy.py`): a frozen copy of the DiT that the
rollout and v_old run, soft-updated towards the trained DiT, checkpointed and restored on resume."""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from deepgen_trainer.algorithms.diffusion_nft import old_policy_decay
from deepgen_trainer.checkpoints.run_checkpoint import SAMPLING_POLICY_FILE, load_checkpoint
from deepgen_trainer.config import parse_args
from deepgen_trainer.engine.distributed import init_world
from deepgen_trainer.engine.sampling_policy import SamplingPolicy
from deepgen_trainer.model.tiny import build_tiny
from deepgen_trainer.run import setup
from deepgen_trainer.train import main, train
from tests.trainer.checkpoints.test_ema import write_prompts
from tests.trainer.checkpoints.test_output_dir import original_checkpoint
from tests.trainer.test_train import SMALL


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
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        policy.soft_update(trained, 1.0)
    with pytest.raises(KeyError, match="lacks"):
        policy.soft_update({}, 0.5)


def test_state_dict_round_trips_and_a_copy_of_another_dit_is_refused() -> None:
    policy = SamplingPolicy(build_tiny(seed=0))
    other = SamplingPolicy(build_tiny(seed=1))
    state = other.state_dict()
    assert state.keys() == {k for k, v in other.dit.state_dict().items() if v.is_floating_point()} != set()
    policy.load_state_dict(state)
    assert_close(policy.dit.state_dict(), other.dit.state_dict(), rtol=0, atol=0)

    key = next(iter(state))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(ValueError, match=rf"0 unexpected keys \[\] and 1 missing keys \['{key}'\]"):
        policy.load_state_dict({k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match=rf"{key} has shape \(1,\), this DiT's is"):
        policy.load_state_dict({**state, key: torch.zeros(1)})
    assert_close(policy.state_dict(), before, rtol=0, atol=0)  # a refused state changes nothing


# --- checkpoint and resume ------------------------------------------------------------------------------

# The paper's schedules keep d ≈ 0 over a few steps (type 1: 0.001·step, type 2: 0 for 75 steps), so in 4
# steps the copy would be all but the trained DiT and a copy lost on resume would barely show. A constant
# d = 0.5 (the cap of type 1) makes the copy lag by half a step's change, which a lost copy cannot match.
DECAY = 0.5
NFT = ["--atrain_algorithm", "diffusionnft", "--atrain_nft_off_policy", "--save_steps", "1"]


def half_decay(mp: pytest.MonkeyPatch) -> None:
    update = importlib.import_module("deepgen_trainer.train.update")
    mp.setattr(update, "old_policy_decay", lambda step, schedule: DECAY)


def nft_args(tmp: Path, output_dir: Path, max_steps: int) -> list[str]:
    yaml = tmp / "train.yaml" if (tmp / "train.yaml").exists() else write_prompts(tmp)
    return [*SMALL, "--dataset_config", str(yaml), *NFT, "--output_dir", str(output_dir), "--max_steps", str(max_steps)]


@pytest.fixture(scope="module")
def nft_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An off-policy DiffusionNFT run of 4 steps, and one of 2 steps resumed to 4 (a checkpoint every step)."""
    tmp = tmp_path_factory.mktemp("nft")
    unbroken, resumed = tmp / "unbroken", tmp / "resumed"
    with pytest.MonkeyPatch.context() as mp:
        half_decay(mp)
        train(parse_args(nft_args(tmp, unbroken, 4), environ={}))
        train(parse_args(nft_args(tmp, resumed, 2), environ={}))
        train(parse_args(nft_args(tmp, resumed, 4), environ={}))
    return unbroken, resumed


def test_the_checkpoint_holds_the_copy_the_run_sampled_with(nft_runs: tuple[Path, Path]) -> None:
    unbroken, _ = nft_runs
    # The copy starts at the initial DiT and after step k is v_k = d·v_{k-1} + (1 − d)·θ_k.
    copy = {k: v for k, v in build_tiny(seed=42).transformer.state_dict().items() if v.is_floating_point()}
    for step in range(1, 5):
        ckpt = load_checkpoint(unbroken / f"checkpoint-{step}")
        assert (ckpt.path / SAMPLING_POLICY_FILE).is_file()
        copy = {k: DECAY * v + (1 - DECAY) * ckpt.trainable[k] for k, v in copy.items()}
        assert_close(ckpt.sampling_policy, copy)
    key = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(ckpt.sampling_policy[key], ckpt.trainable[key])  # it lags the trained DiT


def test_a_resumed_off_policy_run_equals_the_unbroken_one(nft_runs: tuple[Path, Path]) -> None:
    unbroken, resumed = nft_runs
    a, b = load_checkpoint(unbroken / "checkpoint-4"), load_checkpoint(resumed / "checkpoint-4")
    assert_close(b.trainable, a.trainable, rtol=0, atol=0)
    assert_close(b.sampling_policy, a.sampling_policy, rtol=0, atol=0)


def resume_copy(nft_runs: tuple[Path, Path], tmp_path: Path) -> Path:
    """A new output dir holding the resumed run's checkpoint-2."""
    shutil.copytree(nft_runs[1] / "checkpoint-2", tmp_path / "out" / "checkpoint-2")
    return tmp_path / "out"


@pytest.mark.parametrize("bad", ["missing key", "wrong shape"])
def test_a_copy_that_does_not_fit_the_dit_is_refused_naming_the_file_and_the_fix(
    nft_runs: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: str
) -> None:
    out = resume_copy(nft_runs, tmp_path)
    file = out / "checkpoint-2" / SAMPLING_POLICY_FILE
    state = load_file(file)
    key = "transformer_blocks.0.attn.to_q.weight"
    if bad == "missing key":
        del state[key]
    else:
        state[key] = state[key][:1]
    save_file(state, file)
    assert main(nft_args(tmp_path, out, 3)) == 2
    assert f"{file} does not hold a copy of this DiT" in caplog.text
    assert key in caplog.text
    assert "delete that file to resume with the sampling copy restarted at the resumed DiT" in caplog.text
    assert not (out / "checkpoint-3").exists()


@pytest.mark.parametrize(
    ("saved_by", "why"),
    [
        ("older version", "an older version of this trainer did not save it"),
        ("on-policy run", "an on-policy run: --atrain_algorithm diffusionnft without --atrain_nft_off_policy"),
    ],
    ids=["older-version", "on-policy-run"],
)
def test_a_checkpoint_without_the_copy_resumes_from_the_dit_and_says_why(
    nft_runs: tuple[Path, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    saved_by: str,
    why: str,
) -> None:
    out = resume_copy(nft_runs, tmp_path)
    (out / "checkpoint-2" / SAMPLING_POLICY_FILE).unlink()
    if saved_by == "on-policy run":
        config_file = out / "checkpoint-2" / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "atrain_nft_off_policy": False}))
    half_decay(monkeypatch)
    with caplog.at_level(logging.WARNING):
        train(parse_args(nft_args(tmp_path, out, 3), environ={}))
    assert f"{out / 'checkpoint-2'} has no sampling copy of the DiT" in caplog.text
    assert why in caplog.text
    # The copy restarted at the resumed DiT θ_2, so after step 3 it is d·θ_2 + (1 − d)·θ_3.
    resumed_dit = load_checkpoint(out / "checkpoint-2").trainable
    after = load_checkpoint(out / "checkpoint-3")
    assert_close(
        after.sampling_policy, {k: DECAY * v + (1 - DECAY) * after.trainable[k] for k, v in resumed_dit.items()}
    )


def test_from_the_original_trainers_checkpoint_the_copy_is_the_resumed_dit_and_the_log_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    weights = original_checkpoint(out, 3)
    with caplog.at_level(logging.WARNING):
        run = setup(parse_args(nft_args(tmp_path, out, 5), environ={}), init_world())
    run.scorer.close()
    run.tracker.close()
    assert run.sampling_policy is not None
    why = "has no sampling copy of the DiT (the original trainer's checkpoints hold none)"
    assert f"{out / 'checkpoint-3'} {why}" in caplog.text
    dit = {k.removeprefix("transformer."): v for k, v in weights.items() if k.startswith("transformer.")}
    assert_close(run.sampling_policy.state_dict(), dit, rtol=0, atol=0)
