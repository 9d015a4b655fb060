"""The evaluation contract (`deepgen.eval.v1`) on both transports, over `UniGenBenchEval`.

gRPC: ListPrompts, StartRun, SubmitImages (a client stream of batches), FinishRun, GetInfo.
HTTP/JSON mirror (base64 images):
- `GET /v1/prompts[?benchmark=zh]` -> `{"benchmark", "duplicates", "prompts": [{"prompt_id", "prompt"}]}`
- `POST /v1/runs` `{"step": 10[, "benchmark": "zh"]}` -> `{"run_id", "run_secret"}`
- `POST /v1/runs/{run_id}/images`
  `{"run_secret", "images": [{"prompt_id", "duplicate", "image": {"data", "format"}}]}` -> `{"accepted"}`
- `POST /v1/runs/{run_id}/finish` `{"run_secret"}` -> the run summary, with every image's verdicts
A missing or wrong run secret is answered like an unknown run: NOT_FOUND / 404.
- `GET /v1/info`
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from deepgen.common.v1 import types_pb2
from deepgen.eval.v1 import eval_pb2
from deepgen_common.api import Component, ServiceApi
from deepgen_common.convert import image_format_from_pb, info_to_pb
from deepgen_common.errors import InvalidInput
from deepgen_common.grpc_server import parse, parse_stream
from deepgen_common.http_server import ImageIn, InfoOut, decode_base64
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.types import DimensionScore, ImageResult, RunSummary
from eval_unigenbench.runs import MAX_DUPLICATES, MAX_STEP, Submission, UniGenBenchEval
from eval_unigenbench.settings import EvalSettings

EVAL_SERVICE = eval_pb2.DESCRIPTOR.services_by_name["EvalService"].full_name


class PromptOut(BaseModel):
    prompt_id: str
    prompt: str


class PromptsOut(BaseModel):
    benchmark: str
    duplicates: int = Field(description="Images to generate per prompt: duplicates 0..duplicates-1.")
    prompts: list[PromptOut]


class StartRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=0, le=MAX_STEP, description="Training step the images come from.")
    benchmark: str = Field("", description='Benchmark set, e.g. "en" or "zh_long"; empty: the first one served.')
    duplicates: int = Field(
        0, ge=0, le=MAX_DUPLICATES, description="Images per prompt in this run; 0: the service's DUPLICATES."
    )


class StartRunOut(BaseModel):
    run_id: str
    run_secret: str = Field(description="Present it to submit images to and finish the run.")


class GeneratedImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_id: str
    duplicate: int = Field(0, ge=0, lt=2**32, description="0..duplicates-1.")
    image: ImageIn


class SubmitImagesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_secret: str = Field("", max_length=256, description="The run_secret StartRun returned.")
    images: list[GeneratedImageIn]


class FinishRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_secret: str = Field("", max_length=256, description="The run_secret StartRun returned.")


class SubmitImagesOut(BaseModel):
    accepted: int


class DimensionOut(BaseModel):
    name: str
    correct: int
    total: int
    accuracy: float


class ImageVerdictOut(BaseModel):
    prompt_id: str
    duplicate: int
    prompt: str
    testpoints: list[str]
    status: str = Field(description="ok, parse_failure or error; only ok images enter the accuracies.")
    scores: list[int] | None = Field(description="One verdict (1 satisfied, 0 not) per testpoint; null unless ok.")
    analysis: str | None
    detail: str


class RunSummaryOut(BaseModel):
    run_id: str
    step: int
    images_judged: int
    parse_failures: int
    errors: int
    sub_dimensions: list[DimensionOut]
    primary_dimensions: list[DimensionOut]
    overall_accuracy: float | None = Field(description="Pooled over every testpoint; null when nothing was judged.")
    primary_mean_accuracy: float | None = Field(
        description="Mean of the primary dimensions, the leaderboard's Overall; null when nothing was judged."
    )
    answer_rules: str = Field(description="How the judge's answers were read: official or tolerant.")
    benchmark: str = Field(description="Benchmark set of the run.")
    images: list[ImageVerdictOut]


def _summary_to_pb(s: RunSummary) -> eval_pb2.RunSummary:
    def dims(scores: list[DimensionScore]) -> list[eval_pb2.DimensionScore]:
        return [
            eval_pb2.DimensionScore(name=d.name, correct=d.correct, total=d.total, accuracy=d.accuracy) for d in scores
        ]

    return eval_pb2.RunSummary(
        run_id=s.run_id,
        step=s.step,
        images_judged=s.images_judged,
        parse_failures=s.parse_failures,
        errors=s.errors,
        sub_dimensions=dims(s.sub_dimensions),
        primary_dimensions=dims(s.primary_dimensions),
        overall_accuracy=s.overall_accuracy,
        primary_mean_accuracy=s.primary_mean_accuracy,
        answer_rules=s.answer_rules,
        benchmark=s.benchmark,
        images=[_verdict_to_pb(i) for i in s.images],
    )


def _verdict_to_pb(i: ImageResult) -> eval_pb2.ImageVerdict:
    return eval_pb2.ImageVerdict(
        prompt_id=i.prompt_id,
        duplicate=i.duplicate,
        prompt=i.prompt,
        testpoints=i.testpoints,
        status=i.status,
        scores=i.scores or [],
        analysis=i.analysis or "",
        detail=i.detail,
    )


def _submissions_from_pb(request: eval_pb2.SubmitImagesRequest) -> list[Submission]:
    submissions = []
    for i, g in enumerate(request.images):
        if not g.image.data:
            raise InvalidInput(f"images[{i}].image.data is empty: every image needs encoded bytes")
        image_format = image_format_from_pb(g.image.format, f"images[{i}].image.format")
        submissions.append(Submission(g.prompt_id, g.duplicate, g.image.data, image_format))
    return submissions


def eval_api(service: UniGenBenchEval) -> ServiceApi:
    """gRPC servicer (protobuf <-> domain only) and HTTP routes of the evaluation contract."""

    async def list_prompts_pb(raw: bytes) -> bytes:
        request = parse(eval_pb2.ListPromptsRequest, raw)
        benchmark = service.prompts(request.benchmark)
        return eval_pb2.ListPromptsResponse(
            benchmark=benchmark.name,
            prompts=[eval_pb2.BenchmarkPrompt(prompt_id=i.prompt_id, prompt=i.prompt) for i in benchmark.items],
            duplicates=service.settings.duplicates,
        ).SerializeToString()

    async def start_run_pb(raw: bytes) -> bytes:
        request = parse(eval_pb2.StartRunRequest, raw)
        opened = await service.start_run(request.step, request.benchmark, request.duplicates)
        return eval_pb2.StartRunResponse(run_id=opened.run_id, run_secret=opened.secret).SerializeToString()

    async def submit_images_pb(requests: AsyncIterator[bytes]) -> bytes:
        accepted = 0
        async for request in parse_stream(eval_pb2.SubmitImagesRequest, requests):
            accepted += await service.submit(request.run_id, request.run_secret, _submissions_from_pb(request))
        return eval_pb2.SubmitImagesResponse(accepted=accepted).SerializeToString()

    async def finish_run_pb(raw: bytes) -> bytes:
        request = parse(eval_pb2.FinishRunRequest, raw)
        return _summary_to_pb(await service.finish(request.run_id, request.run_secret)).SerializeToString()

    async def info_pb(raw: bytes) -> bytes:
        parse(types_pb2.GetInfoRequest, raw)
        return info_to_pb(service.info()).SerializeToString()

    router = APIRouter()

    @router.get("/v1/prompts", response_model=PromptsOut)
    async def prompts(benchmark: str = "") -> PromptsOut:
        benchmark_set = service.prompts(benchmark)
        return PromptsOut(
            benchmark=benchmark_set.name,
            duplicates=service.settings.duplicates,
            prompts=[PromptOut(prompt_id=i.prompt_id, prompt=i.prompt) for i in benchmark_set.items],
        )

    @router.post("/v1/runs", response_model=StartRunOut)
    async def start_run(body: StartRunIn) -> StartRunOut:
        opened = await service.start_run(body.step, body.benchmark, body.duplicates)
        return StartRunOut(run_id=opened.run_id, run_secret=opened.secret)

    @router.post("/v1/runs/{run_id}/images", response_model=SubmitImagesOut)
    async def submit_images(run_id: str, body: SubmitImagesIn) -> SubmitImagesOut:
        submissions = [
            Submission(g.prompt_id, g.duplicate, decode_base64(g.image.data, f"images[{i}].image.data"), g.image.format)
            for i, g in enumerate(body.images)
        ]
        return SubmitImagesOut(accepted=await service.submit(run_id, body.run_secret, submissions))

    @router.post("/v1/runs/{run_id}/finish", response_model=RunSummaryOut)
    async def finish_run(run_id: str, body: FinishRunIn | None = None) -> RunSummaryOut:
        secret = body.run_secret if body is not None else ""
        return RunSummaryOut(**(await service.finish(run_id, secret)).to_dict())

    @router.get("/v1/info", response_model=InfoOut)
    async def info() -> InfoOut:
        return InfoOut.of(service.info())

    return ServiceApi(
        grpc_service=EVAL_SERVICE,
        http=router,
        description="UniGenBench evaluation service (HTTP/JSON mirror of deepgen.eval.v1).",
        grpc_unary={
            "ListPrompts": list_prompts_pb,
            "StartRun": start_run_pb,
            "FinishRun": finish_run_pb,
            "GetInfo": info_pb,
        },
        grpc_client_stream={"SubmitImages": submit_images_pb},
    )


def eval_component(settings: EvalSettings, metrics: ServiceMetrics) -> Component:
    """The component factory `RunningService` / `main` serve."""
    service = UniGenBenchEval(settings, metrics)
    return Component(service, eval_api(service))
