"""HTTP/JSON transport: the same reward API as gRPC (base64 images), plus health and metrics."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepgen_common.errors import InvalidInput, ServiceError
from deepgen_common.logs import new_request_id
from deepgen_common.service import RewardService
from deepgen_common.types import ImageFormat, Mode, Result, Sample

log = logging.getLogger(__name__)


_API_PATHS = frozenset({"/v1/score", "/v1/info"})


class ImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = Field(description="Base64 (standard alphabet) of the encoded image.")
    format: ImageFormat = Field(ImageFormat.UNSPECIFIED, description="png, jpeg, webp or unspecified (detect).")

    @field_validator("data")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v:
            raise ValueError("image data is empty: every sample needs an encoded image")
        return v


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


class LimitsOut(BaseModel):
    max_batch_size: int
    max_image_bytes: int
    max_image_pixels: int
    max_request_bytes: int
    max_queued_samples: int


class InfoOut(BaseModel):
    name: str
    version: str
    api: str
    backend: str
    limits: LimitsOut
    capabilities: list[Mode]


def _to_samples(body: ScoreRequestIn) -> list[Sample]:
    samples = []
    for i, s in enumerate(body.samples):
        try:
            data = base64.b64decode(s.image.data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"samples[{i}].image.data is not valid base64") from None
        samples.append(
            Sample(image=data, prompt=s.prompt, image_format=s.image.format, group_id=s.group_id, metadata=s.metadata)
        )
    return samples


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class BodyLimit:
    """ASGI middleware: answer 413 for bodies over `limit` bytes, by header or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = _error(
            413,
            "INVALID_ARGUMENT",
            f"request body is over the limit of {self.limit} bytes (MAX_REQUEST_BYTES); split the batch",
        )
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_big(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await too_big(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def create_http_app(service: RewardService) -> ASGIApp:
    """The FastAPI app: `POST /v1/score`, `GET /v1/info`, `/healthz`, `/readyz`, `/metrics`."""
    metrics = service.metrics
    app = FastAPI(
        title=service.backend.name,
        version=service.backend.version,
        description="DeepGen reward service (HTTP/JSON mirror of deepgen.reward.v1).",
    )

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        rid = new_request_id(request.headers.get("x-request-id"))
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["x-request-id"] = rid
        method = request.url.path
        if method in _API_PATHS:  # a fixed label set: arbitrary client paths must not grow the metrics
            metrics.requests.labels(transport="http", method=method, code=str(response.status_code)).inc()
            metrics.request_seconds.labels(transport="http", method=method).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        log.info("request rejected", extra={"fields": {"code": exc.grpc_code, "reason": str(exc)}})
        return _error(exc.http_status, exc.grpc_code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:10]:
            if err.get("type") == "json_invalid":
                problems.append(f"body is not valid JSON: {err.get('ctx', {}).get('error', 'cannot parse')}")
                continue
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return _error(422, "INVALID_ARGUMENT", "; ".join(problems))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return _error(500, "INTERNAL", f"internal error; request id {request.headers.get('x-request-id', '-')}")

    @app.post("/v1/score", response_model=ScoreResponseOut, response_model_exclude_none=True)
    async def score(body: ScoreRequestIn) -> ScoreResponseOut:
        metrics.in_flight.inc()
        try:
            results = await service.score(_to_samples(body), body.mode)
        finally:
            metrics.in_flight.dec()
        return ScoreResponseOut(results=[ResultOut.of(r) for r in results])

    @app.get("/v1/info", response_model=InfoOut)
    async def info() -> InfoOut:
        i = service.info()
        return InfoOut(
            name=i.name,
            version=i.version,
            api=i.api,
            backend=i.backend,
            limits=LimitsOut(**dataclasses.asdict(i.limits)),
            capabilities=list(i.capabilities),
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = service.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return BodyLimit(app, service.settings.max_request_bytes)
