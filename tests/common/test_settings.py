"""Typed settings from the environment."""

from __future__ import annotations

import pydantic
import pytest

from reward_ocr.settings import OcrSettings


def test_defaults_are_the_seed_ports(monkeypatch: pytest.MonkeyPatch):
    for name in ("HTTP_PORT", "GRPC_PORT", "OCR_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    s = OcrSettings()
    assert (s.http_port, s.grpc_port, s.ocr_backend) == (18082, 50051, "rapidocr")
    assert s.scoring.ngram_max == 3
    assert s.scoring.case_sensitive is True


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HTTP_PORT", "9000")
    monkeypatch.setenv("OCR_CASE_SENSITIVE", "false")
    monkeypatch.setenv("OCR_WORKERS", "3")
    s = OcrSettings()
    assert (s.http_port, s.scoring.case_sensitive, s.ocr_workers) == (9000, False, 3)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OCR_BACKEND": "tesseract"}, "ocr_backend"),
        ({"HTTP_PORT": "70000"}, "http_port"),
        ({"MAX_QUEUED_SAMPLES": "8", "MAX_BATCH_SIZE": "16"}, "MAX_QUEUED_SAMPLES .8. must be >= MAX_BATCH_SIZE"),
        ({"OCR_MIN_CONF": "1.5"}, "ocr_min_conf"),
        (
            {"MAX_REQUEST_BYTES": str(16 << 20), "MAX_IMAGE_BYTES": str(13 << 20)},
            "MAX_IMAGE_BYTES .13631488. must be <= 2/3 of MAX_REQUEST_BYTES",
        ),
    ],
)
def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(pydantic.ValidationError, match=message):
        OcrSettings()
