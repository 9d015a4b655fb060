from __future__ import annotations

from pathlib import Path

import pytest

from deepgen_common.reward_api import reward_component
from reward_ocr.backend import OcrBackend
from reward_ocr.settings import OcrSettings
from tests.helpers import ServiceThread, upstream_judge_data


def ocr_settings(**overrides: object) -> OcrSettings:
    values: dict[str, object] = {"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "log_format": "text"}
    values.update(overrides)
    return OcrSettings(**values)


@pytest.fixture(scope="session")
def ocr_service():
    """reward-ocr as deployed by default: RapidOCR in worker processes, one per core."""
    service = ServiceThread(ocr_settings(), reward_component(OcrBackend)).start()
    yield service
    service.stop()


@pytest.fixture(scope="session")
def upstream_data() -> Path:
    """The upstream judge files (templates/, unigenbench/) for parity tests; skips without them (see
    tests.helpers.upstream_judge_data)."""
    return upstream_judge_data()
