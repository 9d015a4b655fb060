"""Conversions between protobuf messages and the domain types (used by servers and clients)."""

from __future__ import annotations

from collections.abc import Sequence

from deepgen.common.v1 import types_pb2
from deepgen.reward.v1 import reward_pb2
from deepgen_common.errors import InvalidInput
from deepgen_common.types import ImageFormat, Limits, Mode, Outcome, Result, Sample, ServiceInfo

_FORMAT_TO_PB = {
    ImageFormat.UNSPECIFIED: types_pb2.IMAGE_FORMAT_UNSPECIFIED,
    ImageFormat.PNG: types_pb2.IMAGE_FORMAT_PNG,
    ImageFormat.JPEG: types_pb2.IMAGE_FORMAT_JPEG,
    ImageFormat.WEBP: types_pb2.IMAGE_FORMAT_WEBP,
}
_FORMAT_FROM_PB = {v: k for k, v in _FORMAT_TO_PB.items()}
_MODE_TO_PB = {Mode.POINTWISE: reward_pb2.SCORING_MODE_POINTWISE, Mode.GROUP: reward_pb2.SCORING_MODE_GROUP}
_MODE_FROM_PB = {**{v: k for k, v in _MODE_TO_PB.items()}, reward_pb2.SCORING_MODE_UNSPECIFIED: Mode.POINTWISE}
_OUTCOME_TO_PB = {
    Outcome.OK: reward_pb2.OUTCOME_OK,
    Outcome.NOT_APPLICABLE: reward_pb2.OUTCOME_NOT_APPLICABLE,
    Outcome.ERROR: reward_pb2.OUTCOME_ERROR,
}
_OUTCOME_FROM_PB = {v: k for k, v in _OUTCOME_TO_PB.items()}
_MODE_NAMES = frozenset(m.value for m in Mode)


def image_format_to_pb(image_format: ImageFormat) -> int:
    return _FORMAT_TO_PB[image_format]


def image_format_from_pb(value: int, field: str) -> ImageFormat:
    """Raises InvalidInput naming `field` for a value this version does not know."""
    image_format = _FORMAT_FROM_PB.get(value)
    if image_format is None:
        raise InvalidInput(f"{field} has unknown value {value}")
    return image_format


def request_to_pb(samples: Sequence[Sample], mode: Mode) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        mode=_MODE_TO_PB[mode],
        samples=[
            reward_pb2.Sample(
                image=types_pb2.Image(data=s.image, format=image_format_to_pb(s.image_format)),
                prompt=s.prompt,
                group_id=s.group_id,
                metadata=dict(s.metadata),
            )
            for s in samples
        ],
    )


def request_from_pb(request: reward_pb2.ScoreRequest) -> tuple[list[Sample], Mode]:
    """Raises InvalidInput naming the first malformed field."""
    mode = _MODE_FROM_PB.get(request.mode)
    if mode is None:
        raise InvalidInput(f"mode has unknown value {request.mode}")
    samples = []
    for i, s in enumerate(request.samples):
        if not s.image.data:
            raise InvalidInput(f"samples[{i}].image.data is empty: every sample needs an encoded image")
        image_format = image_format_from_pb(s.image.format, f"samples[{i}].image.format")
        samples.append(
            Sample(
                image=s.image.data,
                prompt=s.prompt,
                image_format=image_format,
                group_id=s.group_id,
                metadata=dict(s.metadata),
            )
        )
    return samples, mode


def results_to_pb(results: Sequence[Result]) -> reward_pb2.ScoreResponse:
    out = reward_pb2.ScoreResponse()
    for r in results:
        out.results.add(outcome=_OUTCOME_TO_PB[r.outcome], score=r.score, error=r.error, details=dict(r.details))
    return out


def results_from_pb(response: reward_pb2.ScoreResponse) -> list[Result]:
    return [
        Result(
            outcome=_OUTCOME_FROM_PB[r.outcome],
            score=r.score if r.HasField("score") else None,
            error=r.error,
            details=dict(r.details),
        )
        for r in response.results
    ]


def info_to_pb(info: ServiceInfo) -> types_pb2.ServiceInfo:
    lim = info.limits
    return types_pb2.ServiceInfo(
        name=info.name,
        version=info.version,
        api=info.api,
        backend=info.backend,
        limits=types_pb2.Limits(
            max_batch_size=lim.max_batch_size,
            max_image_bytes=lim.max_image_bytes,
            max_image_pixels=lim.max_image_pixels,
            max_request_bytes=lim.max_request_bytes,
            max_queued_samples=lim.max_queued_samples,
        ),
        capabilities=[m.value for m in info.capabilities],
    )


def info_from_pb(info: types_pb2.ServiceInfo) -> ServiceInfo:
    lim = info.limits
    return ServiceInfo(
        name=info.name,
        version=info.version,
        api=info.api,
        backend=info.backend,
        limits=Limits(
            max_batch_size=lim.max_batch_size,
            max_image_bytes=lim.max_image_bytes,
            max_image_pixels=lim.max_image_pixels,
            max_request_bytes=lim.max_request_bytes,
            max_queued_samples=lim.max_queued_samples,
        ),
        # Capabilities a newer server adds are skipped, not fatal.
        capabilities=tuple(Mode(c) for c in info.capabilities if c in _MODE_NAMES),
    )
