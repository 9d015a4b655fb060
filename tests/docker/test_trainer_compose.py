"""The trainer and monitoring parts of the compose stack on a real Docker engine.

- `docker-compose config` / `ps` (1.29) of docker-compose.yml with the `train` and `monitoring`
  profiles, and of docker-compose.multinode.yml standalone: they resolve, the trainer reaches the
  services by their compose names, the multinode trainer uses host networking and refuses to start
  without its node layout. Nothing is pulled (the CUDA base, prom/prometheus and grafana/grafana come
  from Docker Hub, which is not reachable here; Prometheus' and Grafana's configuration files are
  checked by tests/test_monitoring.py).
- The trainer image built from docker/trainer.Dockerfile on the local Debian base (no GPU here) with
  the CPU torch wheel pip finds on this machine, passed in as WHEELS_DIR (build/wheels, git-ignored,
  removed afterwards): its entrypoint (scripts/train.sh -> torchrun) runs one tiny training step on
  CPU, as the unprivileged user, writing a checkpoint to /outputs. The CUDA image itself is not built.

Needs what test_compose.py needs; skips without it, fails under CI=true. The image build also needs a
CPU torch wheel for the base's Python (cp311) in a folder pip uses (`pip config`'s find-links, or
DEEPGEN_TEST_TORCH_WHEEL); without one only the image test skips (fails under CI).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.docker.dockerutil import (
    BASE_IMAGE,
    PASSED_ENV,
    check,
    pip_ca_bundle,
    require_docker_engine,
    run,
    unavailable,
)
from tests.helpers import PROMPT_FIXTURES, REPO

log = logging.getLogger(__name__)

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1200)]

IMAGE = "deepgen/trainer:test"
WHEELS_IN_CONTEXT = "build/wheels"  # relative to the build context (the repository root)
MULTINODE_LAYOUT = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "OCR_URL": "grpc://10.0.0.9:50051"}
TINY_RUN = [
    "--model", "tiny", "--report_to", "none", "--no-bf16", "--deepspeed", "none", "--rollout_n", "2",
    "--prompts_per_rank", "2", "--rollout_micro_batch_size", "2", "--atrain_micro_batch_size", "2",
    "--num_inference_steps", "4", "--timestep_fraction", "0.5", "--image_height", "32", "--image_width", "32",
    "--max_steps", "1", "--save_steps", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def docker_engine() -> None:
    require_docker_engine()


def compose(
    files: list[str], profiles: list[str], command: list[str], env: dict[str, str] | None = None, ok: bool = True
) -> tuple[int, str]:
    """docker-compose (1.29) of `files` with an empty .env and only PASSED_ENV + `env` from here."""
    base_env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty_env_file:
        cmd = ["docker-compose", "--env-file", empty_env_file.name]
        for file in files:
            cmd += ["-f", str(REPO / file)]
        cmd += ["-p", f"deepgen-test-{uuid.uuid4().hex[:8]}"]
        for profile in profiles:
            cmd += ["--profile", profile]
        if ok:
            return 0, check([*cmd, *command], timeout=60, env={**base_env, **(env or {})})
        done = run([*cmd, *command], timeout=60, env={**base_env, **(env or {})})
        return done.returncode, done.stdout + done.stderr


def config(files: list[str], profiles: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    compose(files, profiles, ["ps"], env)  # loads the project as `up` does, device requests included
    return yaml.safe_load(compose(files, profiles, ["config"], env)[1])


def test_train_and_monitoring_profiles_resolve(docker_engine: None) -> None:
    services = config(["docker-compose.yml"], ["train", "monitoring"])["services"]
    assert {"trainer", "prometheus", "grafana", "reward-ocr"} <= set(services)
    trainer = services["trainer"]
    assert trainer["profiles"] == ["train"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    assert trainer["depends_on"] == {"reward-ocr": {"condition": "service_healthy"}}
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    for name in ("prometheus", "grafana"):
        tag = services[name]["image"].rsplit(":", 1)[-1]
        assert tag not in ("", "latest"), f"{name} image must be pinned"

    env = trainer["environment"]
    # The compose services by name (gRPC: every replica the name resolves to).
    assert env["OCR_URL"] == "grpc://reward-ocr:50051"
    assert env["UNIFIEDREWARD_THINK_URL"] == "grpc://reward-unified:50052"
    assert env["UNIGENBENCH_API_URL"] == "grpc://eval-unigenbench:50053"
    assert env["OUTPUT_DIR"] == "/outputs"
    assert env["METRICS_PORT"] == "9400"
    assert env["WANDB_MODE"] == env["SWANLAB_MODE"] == "offline"
    assert env["SD3_5_MODEL_NAME_OR_PATH"].startswith("/models/")
    assert env["QWEN2_5_VL_MODEL_NAME_OR_PATH"].startswith("/models/")
    assert {env[k] for k in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NGPUS")} == {
        "1", "0", "127.0.0.1", "29700", "all",
    }  # fmt: skip
    targets = {v.split(":")[1] for v in trainer["volumes"]}
    assert {"/models", "/outputs", "/home/trainer/.cache/huggingface", "/data/train"} <= targets
    (device,) = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "capabilities": ["gpu"], "device_ids": ["0"]}
    assert trainer["shm_size"] or trainer.get("ipc") == "host"
    assert trainer["restart"] == "no"
    assert trainer["build"]["dockerfile"] == "docker/trainer.Dockerfile"


def test_trainer_settings_come_from_the_environment(docker_engine: None) -> None:
    env = {"TRAINER_GPUS": "0,1,2,3", "OCR_URL": "http://reward-ocr:18082", "CHECKPOINT": "", "NGPUS": "4"}
    trainer = config(["docker-compose.yml"], ["train"], env)["services"]["trainer"]
    (device,) = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert device["device_ids"] == ["0,1,2,3"]
    assert trainer["environment"]["OCR_URL"] == "http://reward-ocr:18082"
    assert trainer["environment"]["CHECKPOINT"] == ""  # empty switches the SFT checkpoint off
    assert trainer["environment"]["NGPUS"] == "4"


def test_multinode_file_resolves_standalone_with_host_networking(docker_engine: None) -> None:
    services = config(["docker-compose.multinode.yml"], [], MULTINODE_LAYOUT)["services"]
    assert set(services) == {"trainer"}
    trainer = services["trainer"]
    assert trainer["network_mode"] == "host"
    assert "ports" not in trainer  # nothing to publish on the host network
    env = trainer["environment"]
    assert (env["NNODES"], env["NODE_RANK"], env["MASTER_ADDR"]) == ("2", "1", "10.0.0.1")
    assert env["OCR_URL"] == "grpc://10.0.0.9:50051"
    (device,) = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"


@pytest.mark.parametrize("missing", ["NNODES", "NODE_RANK", "MASTER_ADDR", "OCR_URL"])
def test_multinode_file_refuses_a_missing_node_layout(docker_engine: None, missing: str) -> None:
    env = {k: v for k, v in MULTINODE_LAYOUT.items() if k != missing}
    code, output = compose(["docker-compose.multinode.yml"], [], ["config"], env, ok=False)
    assert code != 0
    assert f"set {missing}" in output


def cpu_torch_wheel() -> Path | None:
    """A CPU torch wheel for the base's Python 3.11: DEEPGEN_TEST_TORCH_WHEEL, or one in pip's find-links."""
    if os.environ.get("DEEPGEN_TEST_TORCH_WHEEL"):
        return Path(os.environ["DEEPGEN_TEST_TORCH_WHEEL"])
    listing = run([sys.executable, "-m", "pip", "config", "list"], timeout=60).stdout
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".find-links"):
            for folder in value.strip().strip("'\"").split():
                wheels = sorted(Path(folder).glob("torch-*+cpu-cp311-*.whl"))
                if wheels:
                    return wheels[-1]
    return None


@pytest.fixture(scope="module")
def image(docker_engine: None) -> str:
    """deepgen/trainer:test on BASE_IMAGE with the CPU torch wheel; the tag stays (the next build reuses
    its layers), the wheel copy in the build context does not."""
    wheel = cpu_torch_wheel()
    if wheel is None or not wheel.is_file():
        unavailable("no CPU torch wheel for cp311 (set DEEPGEN_TEST_TORCH_WHEEL)", "pip find-links or the variable")
    wheels = REPO / WHEELS_IN_CONTEXT
    wheels.mkdir(parents=True, exist_ok=True)
    target = wheels / wheel.name
    try:
        if not target.exists():
            try:
                os.link(wheel, target)  # no copy of ~190 MB when on the same filesystem
            except OSError:
                shutil.copyfile(wheel, target)
        start = time.monotonic()
        check(
            [
                "docker", "build", "-f", str(REPO / "docker" / "trainer.Dockerfile"),
                "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                "--build-arg", f"PIP_CA_BUNDLE={pip_ca_bundle()}",
                "--build-arg", f"WHEELS_DIR={WHEELS_IN_CONTEXT}",
                "-t", IMAGE, str(REPO),
            ],
            timeout=1200,
        )  # fmt: skip
        log.info("trainer image build: %.1f s", time.monotonic() - start)
    finally:
        # Out of the build context again: every other image build would send it to the daemon.
        shutil.rmtree(wheels, ignore_errors=True)
    return IMAGE


def test_trainer_image_runs_one_tiny_step_through_its_entrypoint(image: str, tmp_path: Path) -> None:
    """The entrypoint (scripts/train.sh -> torchrun, 1 process without a GPU) with the data config from
    DATASET_CONFIG, as the image's unprivileged user writing to /outputs."""
    data = tmp_path / "train"
    data.mkdir()
    prompts = (PROMPT_FIXTURES / "general.txt").read_text().splitlines()[:20]
    (data / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (data / "train.yaml").write_text(
        "datasets:\n  - name: general\n    path: prompts.txt\n    rewards: {clip_sim: 1.0}\n"
    )
    for path in (tmp_path, data, *data.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the image's user
    name = f"deepgen-test-trainer-{uuid.uuid4().hex[:8]}"
    try:
        done = run(
            [
                "docker", "run", "--name", name, "--init",
                "--volume", f"{data}:/data/train:ro",
                "--env", "DATASET_CONFIG=/data/train/train.yaml",
                image, *TINY_RUN, "--output_dir", "/outputs/smoke",
            ],
            timeout=600,
        )  # fmt: skip
        output = (done.stdout + done.stderr)[-4000:]
        assert done.returncode == 0, output
        assert "node 0 of 1, 1 process(es)" in output  # scripts/train.sh chose the layout
        assert "checkpoint step 1 committed: /outputs/smoke/checkpoint-1" in output
        uid = check(["docker", "inspect", "-f", "{{.Config.User}}", name], timeout=30).strip()
        assert uid == "trainer"
    finally:
        run(["docker", "rm", "--force", "--volumes", name], timeout=60)


def test_trainer_image_has_the_cli_tools_and_deepspeed_configs(image: str) -> None:
    script = (
        "from deepgen_trainer.config import DEEPSPEED_CONFIG_NAMES, deepspeed_config_path as p; "
        "import deepgen_trainer.checkpoints.convert; print(all(p(n).is_file() for n in DEEPSPEED_CONFIG_NAMES))"
    )
    out = check(["docker", "run", "--rm", "--entrypoint", "python", image, "-c", script], timeout=120)
    assert out.strip().splitlines()[-1] == "True"
    help_text = check(
        ["docker", "run", "--rm", "--entrypoint", "python", image, "-m", "deepgen_trainer.train", "--help"], timeout=120
    )
    assert "--rollout_n" in help_text
