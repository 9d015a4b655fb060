"""Wait for a service to report ready, over either transport."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deepgen_common.client.credentials import ClientCredentials
from deepgen_common.client.transports import grpc_channel
from deepgen_common.client.urls import ServiceURL, parse_service_url


def is_ready(url: str, timeout_s: float = 2.0, credentials: ClientCredentials | None = None) -> bool:
    """One probe per address until one answers ready: HTTP `GET /readyz` is 200, or gRPC health
    reports SERVING. A URL listing several addresses is ready when any of them is (clients fail
    over to it). Probes carry no token (health stays open) but use TLS for `https://` / `grpcs://`."""
    credentials = credentials if credentials is not None else ClientCredentials.from_env()
    return any(_probe(part, timeout_s, credentials) for part in parse_service_url(url).split())


def _probe(url: ServiceURL, timeout_s: float, credentials: ClientCredentials) -> bool:
    if url.protocol == "http":
        verify = credentials.ssl_context if url.tls else True
        try:
            return httpx.get(f"{url.base_url}/readyz", timeout=timeout_s, verify=verify).status_code == 200
        except httpx.TransportError:
            return False
    with grpc_channel(url, credentials, max_message_bytes=4 * 1024 * 1024) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_ready(
    url: str,
    timeout_s: float = 120.0,
    alive: Callable[[], bool] = lambda: True,
    poll_s: float = 0.2,
    credentials: ClientCredentials | None = None,
) -> None:
    """Block until the service at `url` is ready.

    Raises:
        TimeoutError: not ready within `timeout_s`.
        RuntimeError: `alive()` turned False first (e.g. the service process exited).
    """
    credentials = credentials if credentials is not None else ClientCredentials.from_env()
    deadline = time.monotonic() + timeout_s
    while not is_ready(url, credentials=credentials):
        if not alive():
            raise RuntimeError(f"service at {url} stopped before it became ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"service at {url} not ready after {timeout_s:.0f}s")
        time.sleep(poll_s)
