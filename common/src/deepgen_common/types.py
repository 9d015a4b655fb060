"""Transport-free domain types of the contracts (`deepgen.reward.v1`, `deepgen.eval.v1`).

Servicers convert protobuf / JSON to these and back; backends see only these.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal


class ImageFormat(enum.StrEnum):
    """Declared encoding of an image; UNSPECIFIED lets the decoder detect it."""

    UNSPECIFIED = "unspecified"
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"


class Mode(enum.StrEnum):
    """How a request's samples are scored (see `deepgen.reward.v1.ScoringMode`)."""

    POINTWISE = "pointwise"
    GROUP = "group"


class Outcome(enum.StrEnum):
    """Result kind of one sample; only OK carries a score."""

    OK = "OK"
    NOT_APPLICABLE = "NOT_APPLICABLE"
    ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class Sample:
    """One generated image to score."""

    image: bytes
    prompt: str = ""
    image_format: ImageFormat = ImageFormat.UNSPECIFIED
    group_id: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Result:
    """Outcome of one sample. `score` is set iff outcome is OK; `error` iff outcome is ERROR."""

    outcome: Outcome
    score: float | None = None
    error: str = ""
    details: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.outcome is Outcome.OK) != (self.score is not None):
            raise ValueError(f"a score must be given exactly when the outcome is OK, got {self}")
        if self.score is not None and not math.isfinite(self.score):
            raise ValueError(f"score must be finite, got {self.score}")
        if (self.outcome is Outcome.ERROR) != bool(self.error):
            raise ValueError(f"an error reason must be given exactly when the outcome is ERROR, got {self}")

    @classmethod
    def ok(cls, score: float, **details: str) -> Result:
        return cls(Outcome.OK, score=float(score), details=details)

    @classmethod
    def not_applicable(cls, **details: str) -> Result:
        return cls(Outcome.NOT_APPLICABLE, details=details)

    @classmethod
    def failed(cls, reason: str) -> Result:
        return cls(Outcome.ERROR, error=reason)

    @property
    def value(self) -> float:
        """The score, or NaN when there is none (so failures and N/A become a mask downstream)."""
        return math.nan if self.score is None else self.score


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits a service enforces (mirrors `deepgen.common.v1.Limits`)."""

    max_batch_size: int
    max_image_bytes: int
    max_image_pixels: int
    max_request_bytes: int
    max_queued_samples: int


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """Mirrors `deepgen.common.v1.ServiceInfo`."""

    name: str
    version: str
    api: str
    backend: str
    limits: Limits
    capabilities: tuple[Mode, ...]


@dataclass(frozen=True)
class DimensionScore:
    """Accuracy of one dimension: `correct` of `total` testpoints; mirrors deepgen.eval.v1.DimensionScore."""

    name: str
    correct: int
    total: int
    accuracy: float


ImageStatus = Literal["ok", "parse_failure", "error"]


@dataclass(frozen=True)
class ImageResult:
    """The judge's verdicts on one submitted image; mirrors deepgen.eval.v1.ImageVerdict (and is one row
    of the per-image results CSV). `scores` is set only when `status` is "ok"; `detail` says why a parse
    failure or error happened."""

    prompt_id: str
    duplicate: int
    prompt: str
    testpoints: list[str]
    scores: list[int] | None
    analysis: str | None
    status: ImageStatus
    detail: str = ""


@dataclass(frozen=True)
class RunSummary:
    """The result of one evaluation run; mirrors deepgen.eval.v1.RunSummary. Dimensions are sorted by name;
    accuracies are NaN when nothing was judged. `primary_mean_accuracy` is the leaderboard's Overall,
    `overall_accuracy` the pooled accuracy over every testpoint."""

    run_id: str
    step: int
    images_judged: int
    parse_failures: int
    errors: int
    sub_dimensions: list[DimensionScore]
    primary_dimensions: list[DimensionScore]
    overall_accuracy: float
    primary_mean_accuracy: float
    answer_rules: str = ""
    benchmark: str = ""
    images: list[ImageResult] = field(default_factory=list)

    def to_dict(self, images: bool = True) -> dict[str, Any]:
        """Plain JSON-ready values; NaN accuracies become None (JSON null). `images=False` leaves the
        per-image verdicts out (they go to the results CSV)."""
        data = asdict(self)
        if not images:
            del data["images"]
        for key in ("overall_accuracy", "primary_mean_accuracy"):
            if math.isnan(data[key]):
                data[key] = None
        return data
