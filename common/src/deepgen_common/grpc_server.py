"""gRPC transport: a component's raw handlers, health and reflection on one `grpc.aio` server."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deepgen_common.api import RawClientStream, RawUnary, ServiceApi
from deepgen_common.errors import InvalidInput, ServiceError
from deepgen_common.logs import new_request_id
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.settings import ServiceSettings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


def parse(message_type: type[M], raw: bytes) -> M:
    """Parse a request; raises InvalidInput naming the expected message."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise InvalidInput(f"request body is not a valid {message_type.DESCRIPTOR.full_name} protobuf") from None


class _Call:
    """Request id, status-code mapping and metrics around one RPC."""

    def __init__(self, metrics: ServiceMetrics, method: str) -> None:
        self.metrics = metrics
        self.method = method

    @contextlib.asynccontextmanager
    async def __call__(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        metadata = dict(context.invocation_metadata() or ())
        rid = new_request_id(metadata.get("x-request-id"))
        start = time.perf_counter()
        code = "OK"
        self.metrics.in_flight.inc()
        try:
            await context.send_initial_metadata((("x-request-id", rid),))
            yield
        except ServiceError as exc:
            code = exc.grpc_code
            log.info("request rejected", extra={"fields": {"method": self.method, "code": code, "reason": str(exc)}})
            await context.abort(getattr(grpc.StatusCode, code), str(exc))
        except Exception:
            code = "INTERNAL"
            log.exception("request failed", extra={"fields": {"method": self.method}})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error; request id {rid}")
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(transport="grpc", method=self.method, code=code).inc()
            self.metrics.request_seconds.labels(transport="grpc", method=self.method).observe(
                time.perf_counter() - start
            )


def _unary(metrics: ServiceMetrics, method: str, handler: RawUnary) -> grpc.RpcMethodHandler:
    observed = _Call(metrics, method)

    async def call(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with observed(context):
            return await handler(raw)
        raise AssertionError("unreachable: context.abort raises")

    # No request deserializer: `handler` parses the raw bytes itself.
    return grpc.unary_unary_rpc_method_handler(call)


def _client_stream(metrics: ServiceMetrics, method: str, handler: RawClientStream) -> grpc.RpcMethodHandler:
    observed = _Call(metrics, method)

    async def call(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        async with observed(context):
            return await handler(requests)
        raise AssertionError("unreachable: context.abort raises")

    return grpc.stream_unary_rpc_method_handler(call)


def create_grpc_server(
    api: ServiceApi, metrics: ServiceMetrics, settings: ServiceSettings
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build (not start) the server; returns it, the bound port (useful with port 0) and its health
    servicer, which starts NOT_SERVING."""
    limit = settings.max_request_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ]
    )
    handlers = {name: _unary(metrics, name, h) for name, h in api.grpc_unary.items()}
    handlers |= {name: _client_stream(metrics, name, h) for name, h in api.grpc_client_stream.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(api.grpc_service, handlers),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (api.grpc_service, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    bound = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {settings.host}:{settings.grpc_port}")
    return server, bound, health_servicer


async def parse_stream(message_type: type[M], requests: AsyncIterator[bytes]) -> AsyncIterator[M]:
    """Parse each message of a client stream as it arrives."""
    async for raw in requests:
        yield parse(message_type, raw)
