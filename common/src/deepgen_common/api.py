"""What a service hands the kit to serve: its lifecycle and its API on both transports.

A service is a `Component`: a `Lifecycle` (load once, report readiness, close) plus a `ServiceApi`
(raw gRPC handlers and an HTTP router). `RunningService` wires any component to a gRPC server, an
HTTP app, health, metrics and graceful shutdown, so the reward and eval services share one server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import APIRouter

# gRPC handlers take the raw request bytes (the servicer parses them, so a body that is not a valid
# protobuf gets INVALID_ARGUMENT naming the expected message) and return the serialized response.
RawUnary = Callable[[bytes], Awaitable[bytes]]
RawClientStream = Callable[[AsyncIterator[bytes]], Awaitable[bytes]]


class Lifecycle(Protocol):
    """The transport-independent part of a service."""

    name: str
    version: str
    description: str  # the backend, e.g. "rapidocr" or "vllm:UnifiedReward"

    async def load(self) -> None:
        """Load models and data; the service turns ready when it returns."""

    def ready(self) -> bool:
        """True while requests can be served (loaded, upstream reachable)."""

    async def close(self) -> None:
        """Release workers and connections."""


@dataclass(frozen=True)
class ServiceApi:
    """One API on both transports: `grpc_service` is the full protobuf service name."""

    grpc_service: str
    http: APIRouter
    description: str
    grpc_unary: Mapping[str, RawUnary] = field(default_factory=dict)
    grpc_client_stream: Mapping[str, RawClientStream] = field(default_factory=dict)


@dataclass(frozen=True)
class Component:
    """What `RunningService` serves. `precheck(remaining_s)`, when given, raises Overloaded for a
    request that could not even start before its deadline; the transports call it before reading the
    request body, so refusals under overload cost no parsing."""

    service: Lifecycle
    api: ServiceApi
    precheck: Callable[[float], None] | None = None
