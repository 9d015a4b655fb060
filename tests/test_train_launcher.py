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
LAYOUT = (
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NGPUS",
    "NODE_IP_LIST",
    "INDEX",
    "CHIEF_IP",
    "OUTPUT_DIR",
)


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
    base["OUTPUT_DIR"] = str(fake_bin / "out")  # the node's log and the copied configs go there
    return subprocess.run(["bash", str(SCRIPT), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip


def test_defaults_one_node_every_gpu(fake_bin: Path):
    done = launch(fake_bin, "--model", "tiny", "--max_steps", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "4", "--master_addr", "127.0.0.1",
        "--master_port", "29700", "-m", "deepgen_trainer.train", "--model", "tiny", "--max_steps", "2",
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


def test_the_original_launchers_variables_are_fallbacks(fake_bin: Path):
    done = launch(fake_bin, NODE_IP_LIST="10.0.0.1,10.0.0.2,10.0.0.3", INDEX="2", CHIEF_IP="10.0.0.1")
    assert done.returncode == 0, done.stderr
    argv = done.stdout.split()
    for flag, value in [("--nnodes", "3"), ("--node_rank", "2"), ("--master_addr", "10.0.0.1"),
                        ("--master_port", "29700")]:  # fmt: skip
        assert argv[argv.index(flag) + 1] == value
    ours = launch(fake_bin, NODE_IP_LIST="a,b,c", INDEX="2", CHIEF_IP="c", NNODES="2", NODE_RANK="1", MASTER_ADDR="m")
    argv = ours.stdout.split()
    assert [argv[argv.index(f) + 1] for f in ("--nnodes", "--node_rank", "--master_addr")] == ["2", "1", "m"]


def test_the_node_log_and_the_run_configs_land_in_the_output_dir(fake_bin: Path, tmp_path: Path):
    model, dataset, ds = tmp_path / "model.py", tmp_path / "train.yaml", tmp_path / "zero2.json"
    for path in (model, dataset, ds):
        path.write_text("# used by the run\n")
    out = tmp_path / "run"
    done = launch(fake_bin, "--output_dir", str(out), "--dataset_config", str(dataset), f"--deepspeed={ds}",
                  MODEL_CONFIG=str(model), NODE_RANK="0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "deepgen_trainer.train" in (out / "logs" / "0.log").read_text()
    assert sorted(p.name for p in (out / "configs").iterdir()) == ["model.py", "train.sh", "train.yaml", "zero2.json"]
    assert not (fake_bin / "out").exists()  # --output_dir wins over OUTPUT_DIR


def test_unigenbench_defaults_to_the_original_launchers_address_unless_set(fake_bin: Path):
    (fake_bin / "torchrun").write_text('#!/bin/sh\necho "UNIGENBENCH_API_URL=${UNIGENBENCH_API_URL-unset}"\n')
    assert launch(fake_bin).stdout.strip() == "UNIGENBENCH_API_URL=http://localhost:8000"
    assert launch(fake_bin, UNIGENBENCH_API_URL="").stdout.strip() == "UNIGENBENCH_API_URL="  # compose: off


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
