"""Makefile targets of the training workflow, checked with `make -n` (print, do not run) and the real
`make convert` argument check. No Docker or GPU: `make train` is shown, not run."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(REPO), "--no-print-directory", *args], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


def test_convert_shows_the_command_with_every_option():
    done = make(
        "-n", "convert", "CKPT=outputs/run1", "OUT=run1.pth", "MERGE_ONTO=sft.pth", "DTYPE=bf16", "EMA=1", "DIT_ONLY=1"
    )
    assert done.returncode == 0, done.stderr
    expected = (
        ".venv/bin/python -m deepgen_trainer.convert outputs/run1 --output run1.pth --merge-onto sft.pth --dtype bf16"
        " --ema --dit-only"
    )
    assert expected in done.stdout.splitlines()


def test_convert_with_only_a_checkpoint():
    done = make("-n", "convert", "CKPT=x")
    assert ".venv/bin/python -m deepgen_trainer.convert x" in done.stdout.splitlines()


def test_convert_without_checkpoint_fails_with_the_fix():
    done = make("convert")
    assert done.returncode != 0
    assert "make convert: set CKPT" in done.stderr
    assert "deepgen_trainer.convert" not in done.stdout  # nothing ran


def test_train_runs_the_compose_trainer_with_args():
    done = make("-n", "train", "ARGS=--max_steps 3", "COMPOSE=docker-compose")
    assert "docker-compose --profile train run --rm --use-aliases trainer --max_steps 3" in done.stdout


def test_train_local_runs_the_launcher_from_the_venv():
    done = make("-n", "train-local", "ARGS=--model tiny")
    (line,) = [s for s in done.stdout.splitlines() if "scripts/train.sh" in s]
    assert f'PATH="{REPO}/.venv/bin:' in line
    assert line.endswith("bash scripts/train.sh --model tiny")


def test_help_lists_the_training_targets():
    listing = make("help").stdout
    for target in ("train ", "train-local", "convert"):
        assert f"  {target}" in listing, target


def test_eval_shows_the_command_with_every_option():
    done = make(
        "-n", "eval", "CKPT=outputs/run1", "SETS=en,zh", "BASELINE=outputs/sft-eval", "OUT=e", "ARGS=--model tiny"
    )
    assert done.returncode == 0, done.stderr
    expected = (
        ".venv/bin/python -m deepgen_trainer.evaluation.evaluate_checkpoint outputs/run1 --sets en,zh "
        "--baseline outputs/sft-eval "
        "--output_dir e --model tiny"
    )
    assert expected in done.stdout.splitlines()


def test_eval_without_checkpoint_fails_with_the_fix():
    done = make("eval")
    assert done.returncode != 0
    assert "make eval: set CKPT" in done.stderr
    assert "evaluate_checkpoint" not in done.stdout


def test_scale_ocr_runs_the_script_with_the_replica_count_and_compose_command():
    done = make("-n", "scale-ocr", "REPLICAS=3", "COMPOSE=docker-compose")
    assert 'COMPOSE="docker-compose" bash scripts/scale_ocr.sh 3' in done.stdout.splitlines()


def test_proto_refuses_another_grpc_tools_version():
    done = make("proto", "GRPC_TOOLS_VERSION=0.0.0")
    assert done.returncode != 0
    assert "the stubs are generated with 0.0.0: run make setup" in done.stderr
    assert "grpc_tools.protoc" not in done.stdout  # nothing regenerated
