"""The OCR engines on real rendered text."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
from PIL import Image

from reward_ocr.engines import create_engine
from tests.helpers import render_text


def pixels(lines: list[str]) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(render_text(lines))).convert("RGB"))


def test_rapidocr_reads_rendered_text_in_order():
    engine = create_engine("rapidocr", threads=1)
    tokens = engine.read(pixels(["FIRST LINE", "Second 2026"]))
    assert [t.text for t in tokens] == ["FIRST LINE", "Second 2026"]
    assert all(0.5 < t.confidence <= 1.0 for t in tokens)


def test_rapidocr_blank_image_has_no_tokens():
    engine = create_engine("rapidocr", threads=1)
    assert engine.read(np.full((256, 256, 3), 255, np.uint8)) == []


def test_unknown_engine_lists_the_choices():
    with pytest.raises(ValueError, match="choose 'rapidocr' or 'paddleocr'"):
        create_engine("tesseract", threads=1)  # type: ignore[arg-type]


@pytest.mark.skipif(
    importlib.util.find_spec("paddleocr") is None,
    reason="PaddleOCR is the GPU image's backend (reward-ocr[paddle] + paddlepaddle-gpu); it downloads its "
    "PP-OCRv5 models on first use, which this offline machine cannot do, so it is not installed here",
)
def test_paddleocr_reads_rendered_text():
    engine = create_engine("paddleocr", threads=1)
    tokens = engine.read(pixels(["PADDLE 42"]))
    assert "".join(t.text for t in tokens).replace(" ", "") == "PADDLE42"
