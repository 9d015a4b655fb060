"""Settings of reward-ocr, from environment variables of the same upper-case names."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from deepgen_common.settings import ServiceSettings
from reward_ocr.scoring import ScoringConfig


class OcrSettings(ServiceSettings):
    http_port: int = Field(18082, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535)

    ocr_backend: Literal["rapidocr", "paddleocr"] = Field("rapidocr", description="OCR engine.")
    ocr_executor: Literal["process", "thread"] = Field(
        "process", description="Run engines in worker processes (one engine each) or threads of one process."
    )
    ocr_workers: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        description="Parallel OCR engines (processes or threads); default: one per core.",
    )
    ocr_threads: int = Field(1, ge=1, description="Intra-op threads of each engine.")
    ocr_use_gpu: bool = Field(False, description="Run the engine on the GPU (PaddleOCR on paddlepaddle-gpu).")
    ocr_sample_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Time budget of one sample in a worker; past it the sample is an ERROR and the worker is replaced.",
    )
    max_prompt_chars: int = Field(
        20_000,
        ge=1,
        description="Longest prompt scored; a longer one is an ERROR result for that sample (the batch goes on).",
    )

    ocr_min_conf: float = Field(0.0, ge=0.0, le=1.0, description="Drop OCR tokens below this confidence.")
    ocr_ignore_punct: bool = Field(True, description="Compare letters and digits only.")
    ocr_case_sensitive: bool = Field(True, description="Compare case-sensitively.")
    ocr_ngram_max: int = Field(3, ge=1, description="Longest run of adjacent OCR tokens joined as one candidate.")
    ocr_confusion_fold: bool = Field(True, description="Also compare after folding look-alike characters.")

    @property
    def scoring(self) -> ScoringConfig:
        return ScoringConfig(
            min_conf=self.ocr_min_conf,
            ignore_punct=self.ocr_ignore_punct,
            case_sensitive=self.ocr_case_sensitive,
            ngram_max=self.ocr_ngram_max,
            confusion_fold=self.ocr_confusion_fold,
        )
