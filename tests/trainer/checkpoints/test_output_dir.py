"""Output folders with checkpoints this trainer did not write: the original trainer's `checkpoint-N/`
is resumed from (weights and step; its optimizer state is not), other folders make the run refuse to
start, and neither is ever overwritten."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from deepgen_trainer.checkpoints.run_checkpoint import CheckpointError, latest_checkpoint, save_checkpoint
from deepgen_trainer.config import ConfigError, parse_args
from deepgen_trainer.engine.distributed import init_world
from deepgen_trainer.model.tiny import build_tiny
from deepgen_trainer.run import setup
from deepgen_trainer.train import main, train
from tests.trainer.checkpoints.test_ema import write_prompts
from tests.trainer.test_train import SMALL


class Hostile:
    def __reduce__(self) -> tuple[object, ...]:
        return (print, ("training_args.bin was unpickled",))


def original_checkpoint(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """`checkpoint-<step>/` as the original's HF Trainer + DeepSpeed writes it: model.safetensors with the
    model's filtered state dict, trainer_state.json, a DeepSpeed tag folder and a pickled training_args.bin
    (which must never be read)."""
    model = build_tiny(seed=7)
    weights = {
        k: v + 0.01 for k, v in model.state_dict().items() if not k.startswith(("lmm.", "vae."))
    }  # transformer.*, connector.*, projector_1/2/3.*, meta_queries
    folder = output_dir / f"checkpoint-{step}"
    (folder / f"global_step{step}").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (folder / "latest").write_text(f"global_step{step}")
    torch.save(Hostile(), folder / "training_args.bin")
    return weights


def test_resumes_from_the_originals_checkpoint(tmp_path: Path, caplog, capsys) -> None:
    out = tmp_path / "run"
    weights = original_checkpoint(out, 3)
    args = [*SMALL, "--dataset_config", str(write_prompts(tmp_path)), "--output_dir", str(out), "--max_steps", "5"]
    cfg = parse_args([*args, "--warmup_steps", "4", "--lr_scheduler_type", "linear"], environ={})
    with caplog.at_level(logging.WARNING):
        run = setup(cfg, init_world())
    run.scorer.close()
    run.tracker.close()
    assert run.start_step == 3
    assert run.updater.scheduler.last_epoch == 3  # the LR schedule moved on with the step
    assert "optimizer state (DeepSpeed shards) does not map onto this optimizer and is NOT restored" in caplog.text
    dit = {k.removeprefix("transformer."): v for k, v in weights.items() if k.startswith("transformer.")}
    assert_close(run.model.transformer.state_dict(), dit, rtol=0, atol=0)
    assert_close(run.model.deepgen_only_state(), {k: v for k, v in weights.items() if not k.startswith("transformer.")})
    assert "unpickled" not in capsys.readouterr().out

    train(parse_args(args, environ={}))  # steps 4 and 5 next to the original's checkpoint-3
    assert latest_checkpoint(out) == out / "checkpoint-5"
    assert (out / "checkpoint-3" / "model.safetensors").is_file()  # left alone
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 4


def test_never_replaces_a_checkpoint_it_did_not_write(tmp_path: Path) -> None:
    original_checkpoint(tmp_path, 3)
    before = sorted(p.name for p in (tmp_path / "checkpoint-3").iterdir())
    with pytest.raises(CheckpointError, match=r"checkpoint-3 exists and was not written by this trainer"):
        save_checkpoint(tmp_path, 3, trainable={"w": torch.zeros(1)})
    assert sorted(p.name for p in (tmp_path / "checkpoint-3").iterdir()) == before


def test_refuses_a_folder_with_unknown_checkpoints(tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "pytorch_model.bin").write_bytes(b"")
    argv = [*SMALL, "--dataset_config", str(write_prompts(tmp_path)), "--output_dir", str(out), "--max_steps", "1"]
    with pytest.raises(ConfigError, match=r"holds checkpoints this trainer did not write .*\['checkpoint-2'\]"):
        setup(parse_args(argv, environ={}), init_world())
    assert main(argv) == 2
    assert "Pass a fresh --output_dir" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
