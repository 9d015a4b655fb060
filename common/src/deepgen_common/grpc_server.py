"""gRPC transport: the reward servicer, health and reflection on one `grpc.aio` server."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deepgen.common.v1 import types_pb2
from deepgen.reward.v1 import reward_pb2
from deepgen_common.convert import info_to_pb, request_from_pb, results_to_pb
from deepgen_common.errors import InvalidInput, ServiceError
from deepgen_common.logs import new_request_id
from deepgen_common.service import RewardService

log = logging.getLogger(__name__)

REWARD_SERVICE = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
_RawHandler = Callable[[bytes], Awaitable[bytes]]
M = TypeVar("M", bound=Message)


class RewardServicer:
    """Protobuf <-> domain only. Requests arrive as raw bytes so a body that is not a valid protobuf
    gets INVALID_ARGUMENT naming the expected message, instead of gRPC's generic INTERNAL."""

    def __init__(self, service: RewardService) -> None:
        self.service = service

    async def score(self, raw: bytes) -> bytes:
        request = _parse(reward_pb2.ScoreRequest, raw)
        samples, mode = request_from_pb(request)
        results = await self.service.score(samples, mode)
        return results_to_pb(results).SerializeToString()

    async def get_info(self, raw: bytes) -> bytes:
        _parse(types_pb2.GetInfoRequest, raw)
        return info_to_pb(self.service.info()).SerializeToString()


def _parse(message_type: type[M], raw: bytes) -> M:
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise InvalidInput(f"request body is not a valid {message_type.DESCRIPTOR.full_name} protobuf") from None


def _unary(service: RewardService, method: str, handler: _RawHandler) -> grpc.RpcMethodHandler:
    metrics = service.metrics

    async def call(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata() or ())
        rid = new_request_id(metadata.get("x-request-id"))
        start = time.perf_counter()
        code = "OK"
        metrics.in_flight.inc()
        try:
            await context.send_initial_metadata((("x-request-id", rid),))
            return await handler(raw)
        except ServiceError as exc:
            code = exc.grpc_code
            log.info("request rejected", extra={"fields": {"method": method, "code": code, "reason": str(exc)}})
            await context.abort(getattr(grpc.StatusCode, code), str(exc))
        except Exception:
            code = "INTERNAL"
            log.exception("request failed", extra={"fields": {"method": method}})
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error; request id {rid}")
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(transport="grpc", method=method, code=code).inc()
            metrics.request_seconds.labels(transport="grpc", method=method).observe(time.perf_counter() - start)
        raise AssertionError("unreachable: context.abort raises")

    # No request deserializer: `handler` parses the raw bytes itself (see RewardServicer).
    return grpc.unary_unary_rpc_method_handler(call)


def create_grpc_server(
    service: RewardService, host: str, port: int
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build (not start) the server; returns it, the bound port (useful with port 0) and its health
    servicer, which starts NOT_SERVING."""
    limit = service.settings.max_request_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ]
    )
    servicer = RewardServicer(service)
    handlers = {
        "Score": _unary(service, "Score", servicer.score),
        "GetInfo": _unary(service, "GetInfo", servicer.get_info),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REWARD_SERVICE, handlers),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (REWARD_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    return server, bound, health_servicer
