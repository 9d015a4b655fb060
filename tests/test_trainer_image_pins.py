"""The trainer image runs what the tests run: docker/trainer-pins.txt pins torch, transformers, diffusers,
DeepSpeed and peft at the versions of this environment, the Dockerfile installs the pinned torch on a base
without one, and the compose files build it on the same base. (Building the image needs Docker Hub; this
reads the files.)"""

from __future__ import annotations

import re
from importlib.metadata import version

from tests.helpers import REPO

PINS = REPO / "docker" / "trainer-pins.txt"
DOCKERFILE = REPO / "docker" / "trainer.Dockerfile"


def pins() -> dict[str, str]:
    lines = [line.strip() for line in PINS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return dict(line.split("==") for line in lines)


def dockerfile_default(name: str) -> str:
    (value,) = re.findall(rf"^ARG {name}=(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE)
    return value


def test_pins_are_the_tested_versions() -> None:
    pinned = pins()
    assert set(pinned) == {"torch", "transformers", "diffusers", "deepspeed", "peft"}
    for name, pin in pinned.items():
        assert version(name).split("+")[0] == pin, f"{name}: the tests run {version(name)}, the image pins {pin}"


def test_image_installs_the_pinned_torch_on_a_base_without_one() -> None:
    assert dockerfile_default("TORCH_REQUIREMENT") == f"torch=={pins()['torch']}"
    base = dockerfile_default("BASE_IMAGE")
    assert base.startswith("nvidia/cuda:")  # no torch of its own
    for name in ("docker-compose.yml", "docker-compose.multinode.yml", ".env.example"):
        assert base in (REPO / name).read_text(), f"{name} builds the trainer on another base"
    text = DOCKERFILE.read_text()
    assert "COPY docker/trainer-pins.txt" in text
    assert "--constraint /tmp/torch-constraint.txt" in text
