"""gRPC transport: a component's raw handlers, health and reflection on one `grpc.aio` server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deepgen_common.api import RawClientStream, RawUnary, ServiceApi
from deepgen_common.deadline import remaining_s, set_deadline
from deepgen_common.errors import InvalidInput, Overloaded, ServiceError
from deepgen_common.guards import Guards
from deepgen_common.logs import new_request_id
from deepgen_common.malloc import release_after
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.settings import ServiceSettings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
# The client's deadline timer fires first (the server's starts when the headers arrive) and cancels the
# call just before the server's own deadline: a cancellation this close to the deadline is counted as
# DEADLINE_EXCEEDED.
DEADLINE_SLACK_S = 0.5


def parse(message_type: type[M], raw: bytes) -> M:
    """Parse a request; raises InvalidInput naming the expected message."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise InvalidInput(f"request body is not a valid {message_type.DESCRIPTOR.full_name} protobuf") from None


class _Call:
    """Guards, request id, deadline, status-code mapping and metrics around one RPC.

    Every call is counted once with the code it ended with: a handler cancelled because the client
    left counts as CANCELLED (or DEADLINE_EXCEEDED when its deadline passed), one the drain gave up
    on answers UNAVAILABLE."""

    def __init__(self, metrics: ServiceMetrics, guards: Guards, method: str) -> None:
        self.metrics = metrics
        self.guards = guards
        self.method = method

    async def run(self, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[bytes]]) -> bytes:
        """Run `work` (which reads the request) and return its response bytes."""
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        rid = new_request_id(metadata.get("x-request-id"))
        start = time.perf_counter()
        code = "OK"
        task = asyncio.current_task()
        assert task is not None
        settings = self.guards.settings
        self.metrics.in_flight.inc()
        try:
            self.guards.drain.check_open()
            self.guards.token.check(metadata.get("authorization"))
            timeout = context.time_remaining()
            set_deadline(settings.default_deadline_s if timeout is None else timeout)
            self.guards.admit_early(remaining_s())
            await context.send_initial_metadata((("x-request-id", rid),))
            with self.guards.drain.track(task):  # type: ignore[arg-type]
                return await work()
        except ServiceError as exc:
            code = exc.grpc_code
            log.info("request rejected", extra={"fields": {"method": self.method, "code": code, "reason": str(exc)}})
            if isinstance(exc, Overloaded):
                context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
            await context.abort(getattr(grpc.StatusCode, code), str(exc))
        except asyncio.CancelledError:
            if self.guards.drain.aborted(task):  # type: ignore[arg-type]
                task.uncancel()
                code = "UNAVAILABLE"
                await context.abort(grpc.StatusCode.UNAVAILABLE, "service is shutting down; retry on another replica")
            code = "DEADLINE_EXCEEDED" if remaining_s() <= DEADLINE_SLACK_S else "CANCELLED"
            raise
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
        raise AssertionError("unreachable: context.abort raises")


def _unary(metrics: ServiceMetrics, guards: Guards, method: str, handler: RawUnary) -> grpc.RpcMethodHandler:
    """A unary method served as client-streaming (the same on the wire), so the request message is taken
    only when `_read_one` asks for it: after the guards (drain, token, early admission), one at a time,
    and only once the byte budget has room for a message of the largest size (gRPC does not say a
    message's size before it is read); the hold shrinks to the real size once it is read. Until it is
    asked for, HTTP/2 flow control (no BDP probing, see `create_grpc_server`) keeps the message's bytes
    on the client.

    Reading a message costs about three times its size for a moment (the core's slices, grpcio's
    bytearray and the bytes it returns); the freed heap goes back to the OS right after, and the handler
    holds the only reference to the bytes, dropping them once parsed. So concurrent calls cost about what
    one does: at most MAX_INFLIGHT_BYTES held plus two more largest messages while one is read."""
    observed = _Call(metrics, guards, method)
    settings = guards.settings

    async def call(_: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        async def work() -> bytes:
            async with contextlib.AsyncExitStack() as held:
                async with guards.reading:
                    wait_s = min(settings.max_queue_wait_s, remaining_s())
                    hold = await held.enter_async_context(guards.budget.hold(settings.max_grpc_message_bytes, wait_s))
                    message = [await _read_one(context, settings)]
                    hold.shrink(len(message[0]))
                release_after(hold.n)  # the read copies
                # The handler gets the only reference, so the bytes go as soon as it has parsed them.
                return await handler(message.pop())

        return await observed.run(context, work)

    # No request deserializer: `handler` parses the raw bytes itself.
    return grpc.stream_unary_rpc_method_handler(call)


async def _read_one(context: grpc.aio.ServicerContext, settings: ServiceSettings) -> bytes:
    """The request message of a unary call, within BODY_READ_TIMEOUT_S.

    Read with `context.read()`, not the request iterator: the iterator's suspended generator keeps the
    message alive in a reference cycle with the call until the garbage collector runs, so a burst of
    large calls would hold every message at once."""
    timeout_s = min(settings.body_read_timeout_s, max(remaining_s(), 0.0))
    try:
        async with asyncio.timeout(timeout_s):
            raw = await context.read()
    except TimeoutError:
        raise InvalidInput(f"request message not received within {timeout_s:g} s (BODY_READ_TIMEOUT_S)") from None
    if raw is grpc.aio.EOF:
        raise InvalidInput("the call carried no request message")
    return raw


def _client_stream(
    metrics: ServiceMetrics, guards: Guards, method: str, handler: RawClientStream
) -> grpc.RpcMethodHandler:
    observed = _Call(metrics, guards, method)

    async def call(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        return await observed.run(context, lambda: handler(requests))

    return grpc.stream_unary_rpc_method_handler(call)


def _server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials:
    assert settings.tls_cert_file is not None
    assert settings.tls_key_file is not None
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def create_grpc_server(
    api: ServiceApi, metrics: ServiceMetrics, guards: Guards
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Build (not start) the server; returns it, the bound port (useful with port 0) and its health
    servicer, which starts NOT_SERVING. TLS only when TLS_CERT_FILE is set (mutual with
    TLS_CLIENT_CA_FILE); health and reflection need no token."""
    settings = guards.settings
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_grpc_message_bytes),
            ("grpc.max_send_message_length", settings.max_request_bytes),
            ("grpc.so_reuseport", 0),
            # Without BDP probing a stream's window stays at 64 KiB until its handler reads the message,
            # so the core does not pull the bodies of calls still waiting for `_read_one`.
            ("grpc.http2.bdp_probe", 0),
        ]
    )
    handlers = {name: _unary(metrics, guards, name, h) for name, h in api.grpc_unary.items()}
    handlers |= {name: _client_stream(metrics, guards, name, h) for name, h in api.grpc_client_stream.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(api.grpc_service, handlers),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (api.grpc_service, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{settings.host}:{settings.grpc_port}"
    if settings.tls:
        bound = server.add_secure_port(address, _server_credentials(settings))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {settings.host}:{settings.grpc_port}")
    return server, bound, health_servicer


async def parse_stream(message_type: type[M], requests: AsyncIterator[bytes]) -> AsyncIterator[M]:
    """Parse each message of a client stream as it arrives."""
    async for raw in requests:
        yield parse(message_type, raw)
