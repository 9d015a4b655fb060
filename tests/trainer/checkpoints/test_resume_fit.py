"""Resuming from a checkpoint that does not fit this run: a clear exit 2 naming the file and the fix (not a
traceback), and what carries over when the run adds SFT-aux."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deepgen_trainer.checkpoints.run_checkpoint import save_checkpoint
from deepgen_trainer.train import main
from tests.trainer.checkpoints.test_ema import write_prompts
from tests.trainer.test_train import SMALL, sftaux_yaml


def test_a_resume_whose_data_order_does_not_fit_exits_2_naming_the_file(tmp_path: Path, caplog) -> None:
    """A checkpoint of another --seed (the data order would not continue), or whose sampler state lacks an
    entry: exit 2 with the file and the fix, before any step (was a traceback)."""
    out = tmp_path / "run"
    argv = [*SMALL, "--dataset_config", str(write_prompts(tmp_path)), "--output_dir", str(out), "--save_steps", "1"]
    assert main([*argv, "--max_steps", "1"]) == 0
    assert main([*argv, "--max_steps", "2", "--seed", "7"]) == 2
    assert "sampler_rank0.json does not fit this run" in caplog.text
    assert "resume with the same --seed" in caplog.text
    (out / "checkpoint-1" / "sampler_rank0.json").write_text("{}")
    caplog.clear()
    assert main([*argv, "--max_steps", "2"]) == 2
    assert "sampler_rank0.json does not fit this run: no entry 'prompts'" in caplog.text
    assert not (out / "checkpoint-2").exists()


def test_a_run_that_adds_sft_aux_on_resume_starts_its_images_over(tmp_path: Path, caplog) -> None:
    out = tmp_path / "run"
    argv = [*SMALL, "--dataset_config", str(write_prompts(tmp_path)), "--output_dir", str(out), "--save_steps", "1"]
    assert main([*argv, "--max_steps", "1"]) == 0
    sft = ["--sftaux_dataset_config", str(sftaux_yaml(tmp_path)), "--sftaux_coef", "0.1"]
    assert main([*argv, *sft, "--max_steps", "2"]) == 0
    assert "sampler_rank0.json has no SFT-aux position (saved without SFT-aux): its images start over" in caplog.text
    assert "sftaux" in json.loads((out / "checkpoint-2" / "sampler_rank0.json").read_text())


def test_a_checkpoint_of_another_model_exits_2_naming_it(tmp_path: Path, caplog) -> None:
    """Weights and optimizer state that do not fit this run's DiT: exit 2 with the fix (was a traceback)."""
    out = tmp_path / "run"
    save_checkpoint(out, 1, trainable={"w": torch.zeros(2)}, optimizer_state={"state": {}}, scheduler_state={})
    argv = [*SMALL, "--dataset_config", str(write_prompts(tmp_path)), "--output_dir", str(out), "--max_steps", "2"]
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert "checkpoint-1: its DiT or optimizer state does not fit this run" in errors[0]
    assert 'Missing key(s) in state_dict: "pos_embed.pos_embed"' in errors[0]
    assert not (out / "checkpoint-2").exists()
