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
    """The bounded queue is full; retry later (RESOURCE_EXHAUSTED / 429)."""

    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429


class NotReady(ServiceError):
    """The backend is not loaded yet or its upstream is down (UNAVAILABLE / 503)."""

    grpc_code = "UNAVAILABLE"
    http_status = 503


class ImageError(ValueError):
    """An image cannot be used (bad bytes, wrong format, over a limit). Per item, not per request."""


class NotFound(ServiceError):
    """The request names something that does not exist (NOT_FOUND / 404), e.g. an unknown run id."""

    grpc_code = "NOT_FOUND"
    http_status = 404
