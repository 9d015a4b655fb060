"""Wait for a service to report ready, over either transport."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deepgen_common.client.transports import grpc_target


def is_ready(url: str, timeout_s: float = 2.0) -> bool:
    """One probe: HTTP `GET /readyz` is 200, or gRPC health reports SERVING."""
    if url.startswith(("http://", "https://")):
        try:
            return httpx.get(f"{url.rstrip('/')}/readyz", timeout=timeout_s).status_code == 200
        except httpx.TransportError:
            return False
    with grpc.insecure_channel(grpc_target(url)) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_ready(
    url: str, timeout_s: float = 120.0, alive: Callable[[], bool] = lambda: True, poll_s: float = 0.2
) -> None:
    """Block until the service at `url` is ready.

    Raises:
        TimeoutError: not ready within `timeout_s`.
        RuntimeError: `alive()` turned False first (e.g. the service process exited).
    """
    deadline = time.monotonic() + timeout_s
    while not is_ready(url):
        if not alive():
            raise RuntimeError(f"service at {url} stopped before it became ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"service at {url} not ready after {timeout_s:.0f}s")
        time.sleep(poll_s)
