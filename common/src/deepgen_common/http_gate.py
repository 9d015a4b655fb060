"""The ASGI layer in front of a service's HTTP API: every API request is refused, read and answered here.

In order: draining (503), bearer token (401), deadline from `x-request-timeout-ms` (400 if malformed),
declared size (413), room in the in-flight byte budget before the body is read (429 with Retry-After;
a body of unknown size is read first, one at a time, keeping its turn until it holds its budget), the
body read with a size cap (413, chunked bodies too) and a time limit (408, connection closed). The
handler then runs as its own task, cancelled when the client disconnects (counted as 499), when the
deadline passes (504) or when the drain gives up on it (503). Each request is counted once in
`deepgen_requests_total` with the status it really ended with, labelled by its route template.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deepgen_common.deadline import DEADLINE_HEADER, parse_timeout_header, remaining_s, set_deadline
from deepgen_common.errors import Overloaded, ServiceError, ShuttingDown
from deepgen_common.guards import Guards
from deepgen_common.logs import new_request_id
from deepgen_common.malloc import release_after
from deepgen_common.metrics import ServiceMetrics

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's "client closed request": the client left before the answer


class _Closed(Exception):
    """The client disconnected while its body was being read."""


class _Response:
    """Wraps `send`: remembers the status, adds the request id, closes the connection when asked."""

    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self._rid = request_id.encode()
        self.status: int | None = None

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", self._rid)]}
        await self._send(message)

    async def error(self, status: int, code: str, text: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        """Send a JSON error unless a response has started."""
        if self.status is not None:
            return
        body = json.dumps({"error": {"code": code, "message": text}}).encode()
        await self(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await self({"type": "http.response.body", "body": body})


class HttpGate:
    """ASGI middleware around the FastAPI app; `routes` are the API's own routes (counted and guarded),
    everything else (health, readiness, metrics, docs, 404s) passes straight through."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute], guards: Guards, metrics: ServiceMetrics) -> None:
        self.app = app
        self.routes = routes
        self.guards = guards
        self.metrics = metrics

    def _route(self, scope: Scope) -> str | None:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return getattr(route, "path", None)
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._route(scope) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        response = _Response(send, new_request_id(headers.get("x-request-id")))
        start = time.perf_counter()
        status = 503  # kept only if the server itself cancels this request (uvicorn stopping)
        self.metrics.in_flight.inc()
        try:
            status = await self._serve(scope, receive, response, headers)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(transport="http", method=route, code=str(status)).inc()
            self.metrics.request_seconds.labels(transport="http", method=route).observe(time.perf_counter() - start)

    async def _serve(self, scope: Scope, receive: Receive, response: _Response, headers: dict[str, str]) -> int:
        settings = self.guards.settings
        try:
            self.guards.drain.check_open()
            self.guards.token.check(headers.get("authorization"))
            try:
                set_deadline(parse_timeout_header(headers.get(DEADLINE_HEADER), settings.default_deadline_s))
            except ValueError as exc:
                return await _reply(response, 400, "INVALID_ARGUMENT", str(exc))
            self.guards.admit_early(remaining_s())
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > settings.max_request_bytes:
                return await _too_large(response, settings.max_request_bytes)
            wait_s = min(settings.max_queue_wait_s, remaining_s())
            if declared is not None and declared.isdigit():  # room first, then read
                async with self.guards.budget.hold(int(declared), wait_s):
                    box = await self._read(receive, response)
                    return box if isinstance(box, int) else await self._run(scope, box, receive, response)
            # Unknown size (chunked): one such body is read at a time, and the next only once this one
            # holds its bytes in the budget, so at most one body waits in memory outside it.
            async with contextlib.AsyncExitStack() as held:
                async with self._reading(wait_s):
                    box = await self._read(receive, response)
                    if isinstance(box, int):
                        return box
                    wait_s = min(settings.max_queue_wait_s, remaining_s())
                    await held.enter_async_context(self.guards.budget.hold(len(box[0]), wait_s))
                return await self._run(scope, box, receive, response)
        except ServiceError as exc:
            extra = [(b"retry-after", str(exc.retry_after_s).encode())] if isinstance(exc, Overloaded) else []
            if isinstance(exc, ShuttingDown):
                extra.append((b"connection", b"close"))
            if exc.http_status == 401:
                extra.append((b"www-authenticate", b"Bearer"))
            log.info("request rejected", extra={"fields": {"code": exc.grpc_code, "reason": str(exc)}})
            return await _reply(response, exc.http_status, exc.grpc_code, str(exc), extra)

    @contextlib.asynccontextmanager
    async def _reading(self, wait_s: float) -> AsyncIterator[None]:
        """Hold the lock for reading a body of unknown size; wait up to `wait_s` for it, then raise
        Overloaded (the body before it is waiting for room in the budget)."""
        try:
            async with asyncio.timeout(max(wait_s, 0.0)):
                await self.guards.reading.acquire()
        except TimeoutError:
            raise Overloaded(
                "another request body is being read or waits for room in the in-flight budget "
                "(MAX_INFLIGHT_BYTES); retry later",
                retry_after_s=1,
            ) from None
        try:
            yield
        finally:
            self.guards.reading.release()

    async def _read(self, receive: Receive, response: _Response) -> list[bytes] | int:
        """The body in a one-item list (so only the app keeps it alive once it takes it), or the status
        already answered: 413 over MAX_REQUEST_BYTES, 408 past BODY_READ_TIMEOUT_S, 499 on disconnect."""
        settings = self.guards.settings
        try:
            body = await self._read_body(receive)
        except _Closed:
            return CLIENT_CLOSED
        except TimeoutError:
            text = f"request body not received within {settings.body_read_timeout_s:g} s (BODY_READ_TIMEOUT_S)"
            return await _reply(response, 408, "DEADLINE_EXCEEDED", text, [(b"connection", b"close")])
        if body is None:
            return await _too_large(response, settings.max_request_bytes)
        return [body]

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None when it is over MAX_REQUEST_BYTES. Raises TimeoutError past
        BODY_READ_TIMEOUT_S (or the deadline) and _Closed when the client disconnects.

        The chunks are joined once, at the end (a growing buffer would leave each outgrown copy in the
        heap), and the heap they took goes back to the OS right after."""
        limit = self.guards.settings.max_request_bytes
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(min(self.guards.settings.body_read_timeout_s, max(remaining_s(), 0.0))):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Closed
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > limit:
                    return None
                if not message.get("more_body", False):
                    break
        body = b"".join(chunks)
        del chunks
        release_after(size)
        return body

    async def _run(self, scope: Scope, pending: list[bytes], receive: Receive, response: _Response) -> int:
        """Run the app on the read body; cancel it when the client leaves, the deadline passes or the
        drain gives up."""

        async def replay() -> Message:
            if pending:
                return {"type": "http.request", "body": pending.pop(), "more_body": False}
            return await receive()

        work = asyncio.ensure_future(self.app(scope, replay, response))
        gone = asyncio.ensure_future(_disconnected(receive))
        with self.guards.drain.track(work):  # type: ignore[arg-type]
            done, _ = await asyncio.wait({work, gone}, timeout=max(remaining_s(), 0.0), return_when="FIRST_COMPLETED")
            gone.cancel()
            if work not in done:
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
                if gone in done:
                    return CLIENT_CLOSED
                return await _reply(
                    response, 504, "DEADLINE_EXCEEDED", "request deadline passed before it was answered"
                )
            if work.cancelled() or self.guards.drain.aborted(work):  # type: ignore[arg-type]
                return await _reply(response, 503, "UNAVAILABLE", "service is shutting down; retry on another replica")
            if work.exception() is not None:  # logged by the app's handler, which may have sent the 500
                return await _reply(response, 500, "INTERNAL", "internal error")
            return response.status or 500


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _reply(
    response: _Response, status: int, code: str, text: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> int:
    await response.error(status, code, text, headers)
    return response.status or status


async def _too_large(response: _Response, limit: int) -> int:
    text = f"request body is over the limit of {limit} bytes (MAX_REQUEST_BYTES); split the batch"
    return await _reply(response, 413, "INVALID_ARGUMENT", text, [(b"connection", b"close")])
