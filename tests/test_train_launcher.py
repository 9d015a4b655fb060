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
