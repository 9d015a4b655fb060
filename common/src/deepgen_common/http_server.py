"""HTTP/JSON transport: a component's API router (base64 images), plus health, readiness and metrics."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp

from deepgen_common.api import Lifecycle, ServiceApi
from deepgen_common.errors import InvalidInput, Overloaded, ServiceError
from deepgen_common.guards import Guards
from deepgen_common.http_gate import HttpGate
from deepgen_common.logs import request_id
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.types import ImageFormat, Mode, ServiceInfo

log = logging.getLogger(__name__)


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

    @classmethod
    def of(cls, i: ServiceInfo) -> InfoOut:
        return cls(
            name=i.name,
            version=i.version,
            api=i.api,
            backend=i.backend,
            limits=LimitsOut(**dataclasses.asdict(i.limits)),
            capabilities=list(i.capabilities),
        )


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def decode_base64(data: str, field: str) -> bytes:
    """Standard-alphabet base64; raises InvalidInput naming the field."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field} is not valid base64") from None


def create_http_app(api: ServiceApi, service: Lifecycle, metrics: ServiceMetrics, guards: Guards) -> ASGIApp:
    """The FastAPI app: the API's routes behind `HttpGate`, plus `/healthz`, `/readyz` and `/metrics`."""
    app = FastAPI(title=service.name, version=service.version, description=api.description)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        log.info("request rejected", extra={"fields": {"code": exc.grpc_code, "reason": str(exc)}})
        response = _error(exc.http_status, exc.grpc_code, str(exc))
        if isinstance(exc, Overloaded):
            response.headers["retry-after"] = str(exc.retry_after_s)
        return response

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
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return _error(500, "INTERNAL", f"internal error; request id {request_id.get()}")

    app.include_router(api.http)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = service.ready() and not guards.drain.draining
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return HttpGate(app, list(api.http.routes), guards, metrics)
