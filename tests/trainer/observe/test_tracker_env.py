"""The original's tracker variables reach the real wandb / swanlab runs: read back from the offline run files
(WANDB_MODE / SWANLAB_MODE, WANDB_PROJECT, SWANLAB_PROJ_NAME / SWANLAB_PROJECT, the run name variables)."""

from __future__ import annotations

import pytest

from deepgen_trainer.config import parse_args
from deepgen_trainer.run import build_tracker

TRACKER_VARS = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_RUN_NAME", "WANDB_NAME", "WANDB_DIR", "WANDB_RUN_ID",
                "SWANLAB_MODE", "SWANLAB_PROJECT", "SWANLAB_PROJ_NAME", "SWANLAB_EXP_NAME", "SWANLAB_LOG_DIR",
                "RUN_NAME")  # fmt: skip


@pytest.fixture(autouse=True)
def _no_tracker_env(monkeypatch):
    # The packages read some of these themselves: only the config built from `environ` may carry them here.
    for var in TRACKER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")


def run_trackers(tmp_path, environ: dict[str, str]) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("swanlab")
    cfg = parse_args(["--output_dir", str(tmp_path), "--report_to", "wandb,swanlab"], environ=environ)
    with build_tracker(cfg, rank=0) as tracker:
        tracker.log({"reward/ocr/mean": 0.5}, step=1)


def test_disabled_modes_write_nothing(tmp_path) -> None:
    run_trackers(tmp_path, {"WANDB_MODE": "disabled", "SWANLAB_MODE": "disabled", "WANDB_PROJECT": "x",
                            "SWANLAB_PROJ_NAME": "y"})  # fmt: skip
    assert not (tmp_path / "wandb").exists()
    assert not (tmp_path / "swanlog").exists()


def test_projects_and_run_name_of_the_originals_variables_are_in_the_offline_runs(tmp_path) -> None:
    run_trackers(tmp_path, {"WANDB_PROJECT": "wb-project-17", "SWANLAB_PROJ_NAME": "seed-project-17",
                            "RUN_NAME": "train_20261204_1200"})  # fmt: skip
    [wandb_run] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"wb-project-17" in wandb_run.read_bytes()
    assert b"train_20261204_1200" in wandb_run.read_bytes()
    [swanlab_run] = (tmp_path / "swanlog").glob("run-*/run-*.swanlab")
    assert b"seed-project-17" in swanlab_run.read_bytes()
    assert b"train_20261204_1200" in swanlab_run.read_bytes()
