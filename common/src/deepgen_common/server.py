"""Wiring: one process serves a component over gRPC and HTTP on one event loop, tracks readiness and
stops gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pydantic
import uvicorn
from grpc_health.v1 import health_pb2

from deepgen_common.api import Component
from deepgen_common.grpc_server import create_grpc_server
from deepgen_common.guards import Guards
from deepgen_common.http_server import create_http_app
from deepgen_common.logs import configure_logging
from deepgen_common.metrics import ServiceMetrics
from deepgen_common.settings import ServiceSettings
from deepgen_common.slow_clients import header_timeout_protocol

log = logging.getLogger(__name__)

READINESS_POLL_S = 0.5
# Seconds of SHUTDOWN_GRACE_S kept for answering cancelled requests, stopping the servers and closing
# the backend: in-flight requests get the rest.
STOP_RESERVE_S = 2.0
MAX_HEADER_BYTES = 16 * 1024
KEEP_ALIVE_S = 30
S = TypeVar("S", bound=ServiceSettings)
ComponentFactory = Callable[[S, ServiceMetrics], Component]


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the service owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket created with an explicit IPPROTO_TCP: asyncio enables TCP_NODELAY only
    on sockets whose proto says TCP, and without it every HTTP response waits ~40 ms on Nagle plus
    the client's delayed ACK (uvicorn writes headers and body separately)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


class RunningService:
    """A started service. `grpc_port` / `http_port` are the bound ports (real ones when 0 was asked)."""

    def __init__(self, settings: S, make_component: ComponentFactory[S]) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        component = make_component(settings, self.metrics)
        self.guards = Guards.from_settings(settings, component.precheck)
        self.service = component.service
        self._grpc_service = component.api.grpc_service
        self.grpc_server, self.grpc_port, self._health = create_grpc_server(component.api, self.metrics, self.guards)
        self._http_socket = _listen(settings.host, settings.http_port)
        self.http_port: int = self._http_socket.getsockname()[1]
        tls = {}
        if settings.tls:
            tls = {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file}
            if settings.tls_client_ca_file is not None:
                tls |= {"ssl_ca_certs": str(settings.tls_client_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(
            create_http_app(component.api, self.service, self.metrics, self.guards),
            lifespan="off",
            log_config=None,
            access_log=False,
            http=header_timeout_protocol(settings.header_read_timeout_s),
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            timeout_keep_alive=KEEP_ALIVE_S,
            # The drain has already answered or cancelled every API request when uvicorn stops.
            timeout_graceful_shutdown=1,
            **tls,
        )
        self._http = _Uvicorn(config)
        self._tasks: list[asyncio.Task[None]] = []
        self.failed = asyncio.Event()  # set when the backend cannot load: the process should exit

    async def start(self) -> None:
        """Start both transports (NOT_SERVING), then load the backend in the background."""
        await self.grpc_server.start()
        self._tasks.append(asyncio.create_task(self._http.serve(sockets=[self._http_socket])))
        self._tasks.append(asyncio.create_task(self._load_and_track_readiness()))
        log.info("listening", extra={"fields": {"grpc_port": self.grpc_port, "http_port": self.http_port}})

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", self._grpc_service):
            await self._health.set(name, status)

    async def _load_and_track_readiness(self) -> None:
        service = self.service
        await self._set_health(False)
        try:
            await service.load()
        except Exception:
            log.exception("service failed to load")
            self.failed.set()
            return
        log.info("service loaded", extra={"fields": {"backend": service.description}})
        serving, reported = None, None
        while True:  # readiness can change later, e.g. when a judge's upstream goes down
            ready = service.ready() and not self.guards.drain.draining
            if ready != serving:
                await self._set_health(ready)
                serving = ready
            state = {"ready": ready, "waiting_for": {} if ready else service.waiting_for()}
            if state != reported:
                reported = state
                missing = ", ".join(f"{k}={v}" for k, v in state["waiting_for"].items())
                log.info("ready" if ready else f"not ready, waiting for: {missing}", extra={"fields": state})
            await asyncio.sleep(READINESS_POLL_S)

    async def stop(self) -> None:
        """Drain within SHUTDOWN_GRACE_S: NOT_SERVING and 503 / UNAVAILABLE for new requests at once,
        in-flight ones finish until the grace is nearly spent, the rest are answered 503 / UNAVAILABLE;
        then both servers stop and the backend closes."""
        started = time.monotonic()
        grace = self.settings.shutdown_grace_s
        for task in self._tasks[1:]:
            task.cancel()
        await self._health.enter_graceful_shutdown()
        cancelled = await self.guards.drain.drain(max(0.0, grace - min(STOP_RESERVE_S, grace / 2)))
        if cancelled:
            log.warning("in-flight requests answered 503 at the end of the grace", extra={"fields": {"n": cancelled}})
        self._http.should_exit = True
        await asyncio.gather(self.grpc_server.stop(0.5), self._tasks[0], return_exceptions=True)
        await self.service.close()
        log.info("stopped", extra={"fields": {"seconds": round(time.monotonic() - started, 2)}})


async def serve(settings: S, make_component: ComponentFactory[S]) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = RunningService(settings, make_component)
    await running.start()
    stopped, failed = asyncio.create_task(stop.wait()), asyncio.create_task(running.failed.wait())
    await asyncio.wait((stopped, failed), return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down", extra={"fields": {"grace_s": settings.shutdown_grace_s}})
    await running.stop()
    if running.failed.is_set():
        raise SystemExit(1)


def main(settings_factory: Callable[[], S], make_component: ComponentFactory[S]) -> None:
    """Entry point of `python -m <service>`: settings from env, JSON logs, serve until signalled.
    `--help` lists the settings' environment variables with their defaults instead."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.stdout.write(settings_help(settings_factory) + "\n")  # the command's output, not a log line
        return
    try:
        settings = settings_factory()
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])).upper() or 'settings'}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"invalid settings: {problems}") from None
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings, make_component))


def settings_help(settings_factory: Callable[[], ServiceSettings]) -> str:
    """`--help` of a service: every environment variable its settings read, with default and meaning."""
    lines = ["Settings come from environment variables (no command-line flags):"]
    for name, field in getattr(settings_factory, "model_fields", {}).items():
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        lines.append(f"  {name.upper():28} {default}. {field.description or ''}".rstrip())
    return "\n".join(lines)
