"""The judges' vLLM command lines built from the original DeepGen-RL's launch variables (VLLM_PARALLEL_MODE
with VLLM_DATA_PARALLEL_SIZE or the tensor-parallel size, UNIFIEDREWARD_MODEL, UNIGENBENCH_MODEL_NAME,
GPU_MEMORY_UTILIZATION): `docker-compose config` renders each judge's entrypoint, command and environment
from .env.example plus those variables, and the rendered entrypoint runs here with a stand-in `python3`
that prints the vLLM command line it would start (the real vLLM needs GPUs)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.test_compose_config import compose_config


def vllm_command(service: dict, tmp_path: Path) -> list[str]:
    """The command line the rendered entrypoint execs, with the rendered environment."""
    stand_in = tmp_path / "bin" / "python3"
    stand_in.parent.mkdir(exist_ok=True)
    stand_in.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    stand_in.chmod(0o755)
    entrypoint = [part.replace("$$", "$") for part in service["entrypoint"]]
    env = {k: str(v) for k, v in service["environment"].items() if v is not None}
    env["PATH"] = f"{stand_in.parent}:{os.environ['PATH']}"
    done = subprocess.run([*entrypoint, *service["command"]], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def render(tmp_path: Path, extra: str, files: list[str] | None = None) -> dict:
    (tmp_path / ".env").write_text((REPO / ".env.example").read_text() + extra)
    return compose_config(files or ["docker-compose.yml"], tmp_path)["services"]


def value(argv: list[str], flag: str) -> str:
    assert argv.count(flag) >= 1, (flag, argv)
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]  # the last one counts, as in vLLM's argparse


def test_defaults_keep_tensor_parallelism(tmp_path: Path) -> None:
    services = render(tmp_path, "")
    unified = vllm_command(services["unifiedreward-vllm"], tmp_path)
    assert unified[:4] == [
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "CodeGoat24/UnifiedReward-Think-qwen3vl-8b",
    ]
    assert value(unified, "--tensor-parallel-size") == "1"
    assert "--data-parallel-size" not in unified
    assert value(unified, "--gpu-memory-utilization") == "0.9"
    judge = vllm_command(services["unigenbench-vllm"], tmp_path)
    assert value(judge, "--tensor-parallel-size") == "2"
    assert value(judge, "--served-model-name") == "UniGenBench-EvalModel-qwen3vl-32b-v1"


def test_the_originals_variables_give_its_command_lines(tmp_path: Path) -> None:
    services = render(
        tmp_path,
        "\nVLLM_PARALLEL_MODE=dp\nVLLM_DATA_PARALLEL_SIZE=8\nUNIFIEDREWARD_GPUS=0,1,2,3,4,5,6,7\n"
        "UNIFIEDREWARD_MODEL=/models/UnifiedReward-Think\nVLLM_GPU_MEMORY_UTILIZATION=0.7\n"
        "UNIGENBENCH_PARALLEL_MODE=dp\nUNIGENBENCH_DP=4\nUNIGENBENCH_MODEL_NAME=my-eval-judge\n"
        "GPU_MEMORY_UTILIZATION=0.8\n",
    )
    unified = vllm_command(services["unifiedreward-vllm"], tmp_path)
    assert value(unified, "--model") == "/models/UnifiedReward-Think"
    assert value(unified, "--data-parallel-size") == "8"
    assert "--tensor-parallel-size" not in unified
    assert value(unified, "--gpu-memory-utilization") == "0.7"
    judge = vllm_command(services["unigenbench-vllm"], tmp_path)
    assert (value(judge, "--data-parallel-size"), value(judge, "--gpu-memory-utilization")) == ("4", "0.8")
    assert value(judge, "--served-model-name") == "my-eval-judge"
    assert services["eval-unigenbench"]["environment"]["JUDGE_MODEL"] == "my-eval-judge"
    # The sleep-mode override keeps the same entrypoint and variables.
    sleeping = render(tmp_path, "\nVLLM_PARALLEL_MODE=dp\nVLLM_DATA_PARALLEL_SIZE=8\n",
                      ["docker-compose.yml", "docker-compose.sleep.yml"])  # fmt: skip
    argv = vllm_command(sleeping["unifiedreward-vllm"], tmp_path)
    assert value(argv, "--data-parallel-size") == "8"
    assert "--enable-sleep-mode" in argv


def test_a_parallel_mode_other_than_dp_or_tp_is_refused(tmp_path: Path) -> None:
    service = render(tmp_path, "\nVLLM_PARALLEL_MODE=pp\n")["unifiedreward-vllm"]
    with pytest.raises(AssertionError, match="VLLM_PARALLEL_MODE must be dp or tp, got 'pp'"):
        vllm_command(service, tmp_path)


def test_the_trainer_gets_the_originals_tracker_and_model_config_variables(tmp_path: Path) -> None:
    env = render(tmp_path, "\nSWANLAB_PROJ_NAME=DeepGen-RL\nRUN_NAME=train_1\nMODEL_CONFIG=/data/train/model.py\n")
    trainer = env["trainer"]["environment"]
    assert (trainer["SWANLAB_PROJ_NAME"], trainer["RUN_NAME"], trainer["MODEL_CONFIG"]) == (
        "DeepGen-RL", "train_1", "/data/train/model.py"
    )  # fmt: skip
    assert trainer["SWANLAB_PROJECT"] in ("", None)  # empty: the trainer falls back to SWANLAB_PROJ_NAME
