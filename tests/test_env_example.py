""".env.example documents every variable of the seed and every service setting."""

from __future__ import annotations

import re

import pytest

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
