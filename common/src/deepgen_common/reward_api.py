"""The reward contract (`deepgen.reward.v1`) on both transports, over a `RewardService`.

`reward_component(make_backend)` is what a reward service's `__main__` hands the server kit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

import pydantic
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from deepgen.common.v1 import types_pb2
from deepgen.reward.v1 import reward_pb2
from deepgen_common.api import Component, ServiceApi
from deepgen_common.convert import info_to_pb, request_from_pb, results_to_pb
from deepgen_common.grpc_server import parse
from deepgen_common.http_server import ImageIn, InfoOut, decode_base64
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.service import Backend, RewardService
from deepgen_common.settings import ServiceSettings
from deepgen_common.types import Mode, Result, Sample

REWARD_SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
S = TypeVar("S", bound=ServiceSettings)


class SampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: ImageIn
    prompt: str = Field("", description="Prompt the image was generated from.")
    group_id: str = Field("", description="Group of the sample; required in group mode.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Carried for logging.")


class ScoreRequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: list[SampleIn]
    mode: Mode = Mode.POINTWISE


class ResultOut(BaseModel):
    outcome: Literal["OK", "NOT_APPLICABLE", "ERROR"]
    score: float | None = Field(None, description="Present only when outcome is OK.")
    error: str | None = Field(None, description="Present only when outcome is ERROR.")
    details: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def of(cls, r: Result) -> ResultOut:
        return cls(outcome=r.outcome.value, score=r.score, error=r.error or None, details=dict(r.details))


class ScoreResponseOut(BaseModel):
    results: list[ResultOut]


def _to_samples(body: ScoreRequestIn) -> list[Sample]:
    """Decode every image, dropping each base64 string as soon as it is decoded, so a request's images
    are held about once (not as base64 and bytes side by side)."""
    samples = []
    for i, s in enumerate(body.samples):
        image = decode_base64(s.image.data, f"samples[{i}].image.data")
        s.image.data = ""
        samples.append(Sample(image, s.prompt, s.image.format, s.group_id, s.metadata))
    return samples


async def _parse_score_request(request: Request) -> ScoreRequestIn:
    """The body parsed straight from its bytes (one copy of the strings; no JSON tree, no cached body)."""
    chunks = [chunk async for chunk in request.stream() if chunk]
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)  # the service kit hands over one buffer
    del chunks
    try:
        return ScoreRequestIn.model_validate_json(body)
    except pydantic.ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with every `$ref` replaced by its definition (for `openapi_extra`)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


def reward_api(service: RewardService) -> ServiceApi:
    """gRPC servicer (protobuf <-> domain only) and HTTP routes of the reward contract."""

    async def score_pb(raw: bytes) -> bytes:
        # Each form of a large request is dropped once the next exists (see grpc_server._unary).
        request = parse(reward_pb2.ScoreRequest, raw)
        del raw
        samples, mode = request_from_pb(request)
        del request
        return results_to_pb(await service.score(samples, mode)).SerializeToString()

    async def info_pb(raw: bytes) -> bytes:
        parse(types_pb2.GetInfoRequest, raw)
        return info_to_pb(service.info()).SerializeToString()

    router = APIRouter()

    request_schema = {"required": True, "content": {"application/json": {"schema": _inline_schema(ScoreRequestIn)}}}

    @router.post(
        "/v1/score",
        response_model=ScoreResponseOut,
        response_model_exclude_none=True,
        openapi_extra={"requestBody": request_schema},
    )
    async def score(request: Request) -> ScoreResponseOut:
        body = await _parse_score_request(request)
        mode, samples = body.mode, _to_samples(body)
        del body
        results = await service.score(samples, mode)
        return ScoreResponseOut(results=[ResultOut.of(r) for r in results])

    @router.get("/v1/info", response_model=InfoOut)
    async def info() -> InfoOut:
        return InfoOut.of(service.info())

    return ServiceApi(
        grpc_service=REWARD_SERVICE,
        http=router,
        description="DeepGen reward service (HTTP/JSON mirror of deepgen.reward.v1).",
        grpc_unary={"Score": score_pb, "GetInfo": info_pb},
    )


def reward_component(make_backend: Callable[[S, ServiceMetrics], Backend]) -> Callable[[S, ServiceMetrics], Component]:
    """A component factory for `RunningService` / `main` from a reward backend factory."""

    def make(settings: S, metrics: ServiceMetrics) -> Component:
        service = RewardService(make_backend(settings, metrics), settings, metrics)
        return Component(service, reward_api(service), precheck=lambda remaining: service.admission.check(1, remaining))

    return make
