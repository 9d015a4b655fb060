"""The reward contract (`deepgen.reward.v1`) on both transports, over a `RewardService`.

`reward_component(make_backend)` is what a reward service's `__main__` hands the server kit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

from fastapi import APIRouter
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
    return [
        Sample(
            image=decode_base64(s.image.data, f"samples[{i}].image.data"),
            prompt=s.prompt,
            image_format=s.image.format,
            group_id=s.group_id,
            metadata=s.metadata,
        )
        for i, s in enumerate(body.samples)
    ]


def reward_api(service: RewardService) -> ServiceApi:
    """gRPC servicer (protobuf <-> domain only) and HTTP routes of the reward contract."""

    async def score_pb(raw: bytes) -> bytes:
        samples, mode = request_from_pb(parse(reward_pb2.ScoreRequest, raw))
        return results_to_pb(await service.score(samples, mode)).SerializeToString()

    async def info_pb(raw: bytes) -> bytes:
        parse(types_pb2.GetInfoRequest, raw)
        return info_to_pb(service.info()).SerializeToString()

    router = APIRouter()

    @router.post("/v1/score", response_model=ScoreResponseOut, response_model_exclude_none=True)
    async def score(body: ScoreRequestIn) -> ScoreResponseOut:
        results = await service.score(_to_samples(body), body.mode)
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
        return Component(service, reward_api(service))

    return make
