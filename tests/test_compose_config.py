"""Every compose file (and the sleep-mode override on top of the main file) is valid with `.env` copied from
`.env.example`, as the README says to do: `docker-compose config` (1.29, the oldest version the files
support) resolves it. Only the docker-compose binary is needed, not a Docker engine; without it the
tests skip, except under CI=true, where they fail. And the trainer service of each file passes every
variable the trainer reads."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deepgen_trainer.config import ENV_FIELDS
from deepgen_trainer.config.environment import ALGORITHM_ENV_FIELDS, ALGORITHM_ENV_NOTICES, ENV_ALIASES
from tests.helpers import REPO

FILE_SETS = [
    ["docker-compose.yml"],
    ["docker-compose.yml", "docker-compose.sleep.yml"],
    ["docker-compose.multinode.yml"],
]


def compose_config(files: list[str], project_dir: Path) -> dict:
    """The resolved configuration of `files`, read from `project_dir` (which holds `.env`), with nothing from
    the caller's environment but PATH and HOME."""
    if shutil.which("docker-compose") is None:
        message = "docker-compose is not installed (scripts/docker-env.sh installs 1.29)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    args = ["docker-compose", "--project-directory", str(project_dir)]
    for name in files:
        args += ["-f", str(REPO / name)]
    env = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    done = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, f"{' '.join(files)} with .env.example as .env:\n{done.stderr[-3000:]}"
    return yaml.safe_load(done.stdout)


@pytest.fixture
def env_dir(tmp_path: Path) -> Path:
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    return tmp_path


@pytest.mark.parametrize("files", FILE_SETS, ids=lambda files: "+".join(files))
def test_valid_with_env_example(env_dir: Path, files: list[str]) -> None:
    config = compose_config(files, env_dir)
    assert config["services"]


def test_multinode_declares_the_outputs_volume_of_env_example(env_dir: Path) -> None:
    config = compose_config(["docker-compose.multinode.yml"], env_dir)
    assert "train-outputs:/outputs:rw" in config["services"]["trainer"]["volumes"]  # 1.29 writes short syntax
    assert "train-outputs" in config["volumes"]


def test_replicas_publish_port_ranges_on_loopback(env_dir: Path) -> None:
    replica = compose_config(["docker-compose.yml"], env_dir)["services"]["reward-ocr-replica"]
    assert sorted(replica["ports"]) == ["127.0.0.1:18090-18099:18082/tcp", "127.0.0.1:50061-50070:50051/tcp"]


def gpus(service: dict) -> set[str]:
    """The GPU ids a service reserves (device_ids of its NVIDIA device requests)."""
    found: set[str] = set()
    for device in service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []):
        for ids in device.get("device_ids", []):
            found |= {i.strip() for i in str(ids).split(",")}
    return found


def test_env_example_gives_trainer_and_judges_disjoint_gpus(env_dir: Path) -> None:
    services = compose_config(["docker-compose.yml"], env_dir)["services"]
    layout = {name: gpus(services[name]) for name in ("trainer", "unifiedreward-vllm", "unigenbench-vllm")}
    assert layout == {"trainer": {"0"}, "unifiedreward-vllm": {"1"}, "unigenbench-vllm": {"2", "3"}}
    # ... and the trainer is told the layout, so that its start check sees a .env that breaks it.
    environment = services["trainer"]["environment"]
    assert (environment["TRAINER_GPUS"], environment["UNIFIEDREWARD_GPUS"], environment["UNIGENBENCH_GPUS"]) == (
        "0",
        "1",
        "2,3",
    )


@pytest.mark.parametrize("file", ["docker-compose.yml", "docker-compose.multinode.yml"])
def test_the_trainer_service_passes_every_variable_the_trainer_reads(file: str) -> None:
    # A variable the service does not list never reaches the container: the run would silently take the
    # flag's default (an ATRAIN_NFT_BETA, a run name or a model config set in the shell, ignored).
    environment = yaml.safe_load((REPO / file).read_text())["services"]["trainer"]["environment"]
    aliases = {name for names in ENV_ALIASES.values() for name in names}
    read = set(ENV_FIELDS) | aliases | set(ALGORITHM_ENV_FIELDS) | set(ALGORITHM_ENV_NOTICES)
    assert read <= set(environment), sorted(read - set(environment))
