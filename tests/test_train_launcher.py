"""scripts/train.sh, the trainer image's entrypoint: node layout from the environment, arguments passed
on to the trainer. A stand-in `torchrun` on PATH prints the command it got (the real torchrun under this
script is exercised by the trainer image's smoke run in tests/docker/test_trainer_compose.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "train.sh"
LAYOUT = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NGPUS")


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """torchrun that prints its arguments one per line, and python that counts 4 GPUs."""
    (tmp_path / "torchrun").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (tmp_path / "python").write_text("#!/bin/sh\necho 4\n")
    for tool in ("torchrun", "python"):
        (tmp_path / tool).chmod(0o755)
    return tmp_path


def launch(fake_bin: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in LAYOUT}
    base["PATH"] = f"{fake_bin}:{base['PATH']}"
    return subprocess.run(["bash", str(SCRIPT), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip


def test_defaults_one_node_every_gpu(fake_bin: Path):
    done = launch(fake_bin, "--model", "tiny", "--max_steps", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "4", "--master_addr", "127.0.0.1",
        "--master_port", "29500", "-m", "deepgen_trainer.train", "--model", "tiny", "--max_steps", "2",
    ]  # fmt: skip


def test_layout_from_the_environment(fake_bin: Path):
    done = launch(fake_bin, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29600", NGPUS="8")
    argv = done.stdout.split()
    for flag, value in [("--nnodes", "2"), ("--node_rank", "1"), ("--nproc_per_node", "8"),
                        ("--master_addr", "10.0.0.1"), ("--master_port", "29600")]:  # fmt: skip
        assert argv[argv.index(flag) + 1] == value


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NGPUS": "eight"}, "NGPUS must be a non-negative integer"),
        ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK 2 must be below NNODES 2"),
        ({"NGPUS": "0"}, "NGPUS and NNODES must be >= 1"),
    ],
)
def test_bad_layout_fails_with_a_message(fake_bin: Path, env: dict[str, str], message: str):
    done = launch(fake_bin, **env)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stdout == ""  # torchrun never started


STACK = {
    "UNIFIEDREWARD_THINK_URL": "grpc://reward-unified:50052",
    "UNIGENBENCH_API_URL": "grpc://eval-unigenbench:50053",
}


def test_gpu_layout_of_env_example_starts(fake_bin: Path):
    done = launch(fake_bin, TRAINER_GPUS="0", UNIFIEDREWARD_GPUS="1", UNIGENBENCH_GPUS="2,3", **STACK)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("layout", "clash"),
    [
        ({"TRAINER_GPUS": "0,1", "UNIFIEDREWARD_GPUS": "1"}, "TRAINER_GPUS=0,1 and UNIFIEDREWARD_GPUS=1 share GPU 1"),
        ({"TRAINER_GPUS": "0", "UNIGENBENCH_GPUS": "3, 0"}, "TRAINER_GPUS=0 and UNIGENBENCH_GPUS=3, 0 share GPU 0"),
        ({"UNIFIEDREWARD_GPUS": "1,2", "UNIGENBENCH_GPUS": "2,3"}, "UNIFIEDREWARD_GPUS=1,2 and UNIGENBENCH_GPUS=2,3"),
    ],
)
def test_a_gpu_clash_stops_the_start_naming_it(fake_bin: Path, layout: dict[str, str], clash: str):
    done = launch(
        fake_bin, **{"TRAINER_GPUS": "0", "UNIFIEDREWARD_GPUS": "1", "UNIGENBENCH_GPUS": "2,3", **STACK, **layout}
    )
    assert done.returncode == 2
    assert f"GPU clash: {clash}" in done.stderr
    assert done.stderr.count("\n") == 1  # one line
    assert done.stdout == ""  # torchrun never started


def test_judges_may_share_gpus_in_sleep_mode_or_when_remote(fake_bin: Path):
    judges = {"TRAINER_GPUS": "0", "UNIFIEDREWARD_GPUS": "1,2", "UNIGENBENCH_GPUS": "1,2"}
    assert launch(fake_bin, **judges, **STACK, JUDGES_SLEEP_MODE="true").returncode == 0
    assert launch(fake_bin, **judges, **STACK).returncode == 2
    # A judge on another host (its URL is not this stack's service): its GPU variable is not this node's.
    remote = {**STACK, "UNIFIEDREWARD_THINK_URL": "grpcs://judges.example:50052"}
    assert launch(fake_bin, TRAINER_GPUS="0,1", UNIFIEDREWARD_GPUS="1", **remote).returncode == 0
