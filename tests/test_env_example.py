""".env.example documents every variable of the seed, every service setting, every deployment variable
of the trainer and its launcher, and every variable the compose files read."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from deepgen_trainer.config import ENV_FIELDS
from eval_unigenbench.settings import EvalSettings
from reward_ocr.settings import OcrSettings
from reward_unified.settings import UnifiedSettings
from tests.helpers import REPO

SEED = [
    "SD3_5_MODEL_NAME_OR_PATH",
    "QWEN2_5_VL_MODEL_NAME_OR_PATH",
    "CLIP_MODEL_NAME_OR_PATH",
    "CHECKPOINT",
    "OUTPUT_DIR",
    "OCR_URL",
    "UNIFIEDREWARD_THINK_URL",
    "UNIFIEDREWARD_THINK_WORKERS",
    "UNIGENBENCH_API_URL",
    "UNIGENBENCH_WORKERS",
    "DATASET_CONFIG",
    "EVAL_DATASET_CONFIG",
    "SFTAUX_DATASET_CONFIG",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NGPUS",
    "WANDB_MODE",
    "SWANLAB_MODE",
]
# Read by scripts/train.sh (torchrun's node layout), not by the trainer itself.
LAUNCHER = ["NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NGPUS"]
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.sleep.yml", "docker-compose.multinode.yml"]
# Differ per service, or are paths inside the container: set in docker-compose.yml.
PER_SERVICE = {
    "HOST",
    "HTTP_PORT",
    "GRPC_PORT",
    "JUDGE_URL",
    "JUDGE_MODEL",
    "TEMPLATES_DIR",
    "UNIGENBENCH_DATA_DIR",
    "RESULTS_DIR",
}


def documented() -> set[str]:
    text = (REPO / ".env.example").read_text()
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)(?==|\s+defaults)", text, flags=re.MULTILINE))


def test_seed_variables_are_listed():
    assert set(SEED) <= documented(), set(SEED) - documented()


@pytest.mark.parametrize("settings_class", [OcrSettings, UnifiedSettings, EvalSettings])
def test_every_service_setting_is_listed(settings_class: type):
    names = {name.upper() for name in settings_class.model_fields} - PER_SERVICE - {"WORKERS"}
    assert names <= documented(), names - documented()


def test_trainer_and_launcher_variables_are_listed():
    names = set(ENV_FIELDS) | set(LAUNCHER)
    assert names <= documented(), names - documented()


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def compose_variables(file: str) -> set[str]:
    """Variables a compose file reads: `${VAR...}` in any value (comments excluded), and the
    `environment` entries without a value, which pass the caller's variable through."""
    config = yaml.safe_load((REPO / file).read_text())
    names = {m for text in _strings(config) for m in re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text)}
    for service in config["services"].values():
        environment = service.get("environment") or {}
        if isinstance(environment, dict):
            names |= {name for name, value in environment.items() if value is None}
    return names


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_every_compose_variable_is_listed(file: str):
    names = compose_variables(file)
    assert names, f"{file}: found no variables (did the parsing break?)"
    assert names <= documented(), names - documented()
