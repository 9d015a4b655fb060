"""HTTP/JSON transport: a component's API router (base64 images), plus health, readiness and metrics."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepgen_common.api import Lifecycle, ServiceApi
from deepgen_common.errors import InvalidInput, ServiceError
from deepgen_common.logs import new_request_id
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.settings import ServiceSettings
from deepgen_common.types import ImageFormat, Mode, ServiceInfo

log = logging.getLogger(__name__)

_OPERATIONAL_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


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


def decode_base64(data: str, field: str) -> bytes:
    """Standard-alphabet base64; raises InvalidInput naming the field."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field} is not valid base64") from None


def create_http_app(api: ServiceApi, service: Lifecycle, metrics: ServiceMetrics, settings: ServiceSettings) -> ASGIApp:
    """The FastAPI app: the API's routes plus `/healthz`, `/readyz` and `/metrics`."""
    app = FastAPI(title=service.name, version=service.version, description=api.description)
    api_routes = frozenset(id(r) for r in api.http.routes)

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        rid = new_request_id(request.headers.get("x-request-id"))
        start = time.perf_counter()
        operational = request.url.path in _OPERATIONAL_PATHS
        if not operational:
            metrics.in_flight.inc()
        try:
            response = await call_next(request)
        finally:
            if not operational:
                metrics.in_flight.dec()
        response.headers["x-request-id"] = rid
        route = request.scope.get("route")
        # Label by route template ("/v1/runs/{run_id}/images"), and only the API's own routes: the
        # label set stays fixed whatever paths clients send.
        if route is not None and id(route) in api_routes:
            method = route.path
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

    app.include_router(api.http)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = service.ready()
        body = {"ready": ready, "waiting_for": {} if ready else service.waiting_for()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return BodyLimit(app, settings.max_request_bytes)
