"""OCR engines behind one interface: RGB pixels in, (text, confidence) tokens out."""

from __future__ import annotations

import logging
from typing import Literal, Protocol

import numpy as np

from reward_ocr.scoring import Token

log = logging.getLogger(__name__)

EngineName = Literal["rapidocr", "paddleocr"]


class OcrEngine(Protocol):
    def read(self, rgb: np.ndarray) -> list[Token]:
        """OCR an (H, W, 3) uint8 RGB image; tokens in reading order."""


class RapidOcrEngine:
    """PP-OCR models on ONNX Runtime (models ship in the `rapidocr` wheel, so it runs offline)."""

    def __init__(self, threads: int) -> None:
        from rapidocr import RapidOCR

        self._ocr = RapidOCR(
            params={
                "EngineConfig.onnxruntime.intra_op_num_threads": threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
                "Global.log_level": "error",
            }
        )

    def read(self, rgb: np.ndarray) -> list[Token]:
        out = self._ocr(np.ascontiguousarray(rgb[:, :, ::-1]))  # RapidOCR expects OpenCV's BGR order
        texts = out.txts or ()
        scores = out.scores or ()
        return [Token(str(t), float(c)) for t, c in zip(texts, scores, strict=True)]


class PaddleOcrEngine:
    """PaddleOCR 3.x (PP-OCRv5 pipeline) on paddlepaddle; downloads its models on first use, so it
    is meant for the GPU image. Not thread-safe: one instance per worker process."""

    def __init__(self, threads: int, use_gpu: bool) -> None:
        from paddleocr import PaddleOCR

        self._ocr = PaddleOCR(
            use_doc_orientation_classify=False,
            use_doc_unwarping=False,
            use_textline_orientation=False,
            device="gpu" if use_gpu else "cpu",
            cpu_threads=threads,
        )

    def read(self, rgb: np.ndarray) -> list[Token]:
        tokens: list[Token] = []
        for page in self._ocr.predict(np.ascontiguousarray(rgb[:, :, ::-1])):
            tokens.extend(Token(str(t), float(c)) for t, c in zip(page["rec_texts"], page["rec_scores"], strict=True))
        return tokens


def create_engine(name: EngineName, threads: int, use_gpu: bool = False) -> OcrEngine:
    if name == "rapidocr":
        if use_gpu:
            log.warning("OCR_USE_GPU is ignored by rapidocr (CPU ONNX Runtime); use OCR_BACKEND=paddleocr")
        return RapidOcrEngine(threads)
    if name == "paddleocr":
        return PaddleOcrEngine(threads, use_gpu)
    raise ValueError(f"unknown OCR backend {name!r}; choose 'rapidocr' or 'paddleocr'")
