"""Typed errors raised by domain code; each transport maps them to status codes in one place."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a request can end with. The message is safe to send to the client."""

    grpc_code: str = "INTERNAL"
    http_status: int = 500


class InvalidInput(ServiceError):
    """The request is malformed or over a limit (INVALID_ARGUMENT / 400)."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 400


class Overloaded(ServiceError):
    """The request cannot be answered in time; retry after `retry_after_s` (RESOURCE_EXHAUSTED / 429,
    sent as `Retry-After` over HTTP and `retry-after` trailing metadata over gRPC)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(ServiceError):
    """The backend is not loaded yet or its upstream is down (UNAVAILABLE / 503)."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class ShuttingDown(NotReady):
    """The service is draining after SIGTERM; retry on another replica (UNAVAILABLE / 503)."""


class Unauthenticated(ServiceError):
    """The call lacks the bearer token API_TOKEN asks for (UNAUTHENTICATED / 401)."""

    grpc_code = "UNAUTHENTICATED"
    http_status = 401


class ImageError(ValueError):
    """An image cannot be used (bad bytes, wrong format, over a limit). Per item, not per request."""


class NotFound(ServiceError):
    """The request names something that does not exist (NOT_FOUND / 404), e.g. an unknown run id."""

    grpc_code = "NOT_FOUND"
    http_status = 404
