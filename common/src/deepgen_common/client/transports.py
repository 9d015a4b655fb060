"""The two wire transports of the reward contract behind one interface.

A transport makes exactly one attempt; retries, chunking and the breaker live in `RewardClient`.
"""

from __future__ import annotations

import base64
import itertools
import json
import socket
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import grpc
import httpx

from deepgen.common.v1 import types_pb2
from deepgen.reward.v1 import reward_pb2
from deepgen_common.client.credentials import ClientCredentials
from deepgen_common.client.urls import ServiceURL
from deepgen_common.convert import info_from_pb, request_to_pb, results_from_pb
from deepgen_common.deadline import DEADLINE_HEADER
from deepgen_common.types import Limits, Mode, Outcome, Result, Sample, ServiceInfo


class TransientError(ConnectionError):
    """A failure worth retrying: unreachable, overloaded or restarting service."""


class OverloadedError(TransientError):
    """The service is up but refused the request for now (RESOURCE_EXHAUSTED / 429); it suggests
    retrying after `retry_after_s` seconds when it says so."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date or garbage: fall back to the client's own backoff
        return None


class RewardServiceError(RuntimeError):
    """The service answered with a non-retryable error (bad input, internal error, deadline)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Transport(Protocol):
    def score(self, samples: Sequence[Sample], mode: Mode, timeout_s: float) -> list[Result]: ...
    def info(self, timeout_s: float) -> ServiceInfo: ...
    def close(self) -> None: ...


_RETRYABLE_GRPC = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
_RETRYABLE_HTTP = {408, 429, 502, 503, 504}  # 408: the service gave up reading a slow body
_SCORE = f"/{reward_pb2.DESCRIPTOR.services_by_name['RewardService'].full_name}/Score"
_INFO = f"/{reward_pb2.DESCRIPTOR.services_by_name['RewardService'].full_name}/GetInfo"


def grpc_channel(url: ServiceURL, credentials: ClientCredentials, max_message_bytes: int) -> grpc.Channel:
    """A channel to one gRPC URL (TLS for `grpcs://`) with client-side round-robin load balancing
    over every address its name resolves to."""
    options = [
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Reconnect quickly to a restarted replica instead of gRPC's default 1 s..120 s backoff.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if url.tls:
        return grpc.secure_channel(url.grpc_target, credentials.grpc_channel_credentials(), options=options)
    return grpc.insecure_channel(url.grpc_target, options=options)


def rpc_error(exc: grpc.RpcError) -> TransientError | RewardServiceError:
    """The client error for a failed call: TransientError (worth retrying) or RewardServiceError."""
    code, details = exc.code(), exc.details() or ""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        trailers = dict(exc.trailing_metadata() or ()) if isinstance(exc, grpc.Call) else {}
        return OverloadedError(f"{code.name}: {details}", _retry_after(trailers.get("retry-after")))
    if code in _RETRYABLE_GRPC:
        return TransientError(f"{code.name}: {details}")
    return RewardServiceError(code.name, details)


class GrpcTransport:
    """gRPC to one URL, with client-side round-robin load balancing over every resolved address."""

    def __init__(self, url: ServiceURL, credentials: ClientCredentials, max_message_bytes: int) -> None:
        self.url = url
        self._metadata = credentials.grpc_metadata
        self._channel = grpc_channel(url, credentials, max_message_bytes)
        self._score = self._channel.unary_unary(
            _SCORE,
            request_serializer=reward_pb2.ScoreRequest.SerializeToString,
            response_deserializer=reward_pb2.ScoreResponse.FromString,
        )
        self._info = self._channel.unary_unary(
            _INFO,
            request_serializer=types_pb2.GetInfoRequest.SerializeToString,
            response_deserializer=types_pb2.ServiceInfo.FromString,
        )

    def _call(self, stub: grpc.UnaryUnaryMultiCallable, request: object, timeout_s: float) -> object:
        try:
            return stub(request, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    def score(self, samples: Sequence[Sample], mode: Mode, timeout_s: float) -> list[Result]:
        return results_from_pb(self._call(self._score, request_to_pb(samples, mode), timeout_s))  # type: ignore[arg-type]

    def info(self, timeout_s: float) -> ServiceInfo:
        return info_from_pb(self._call(self._info, types_pb2.GetInfoRequest(), timeout_s))  # type: ignore[arg-type]

    def close(self) -> None:
        self._channel.close()


class HttpTransport:
    """HTTP/JSON to one URL. Over plain HTTP, spreads requests round-robin over every address the
    host name resolves to (re-resolved every `resolve_every_s`), like gRPC's round_robin, so
    replicas behind one DNS name share the load; over HTTPS it dials the name (TLS checks it)."""

    def __init__(self, url: ServiceURL, credentials: ClientCredentials, resolve_every_s: float = 30.0) -> None:
        self.url = url
        self.base_url = url.base_url
        (address,) = url.addresses
        self._tls, self._host, self._port = url.tls, address.host, address.port
        self._resolve_every_s = resolve_every_s
        self._lock = threading.Lock()
        self._addresses: list[str] = []
        self._resolved_at = -float("inf")
        self._next = itertools.count()
        # TCP_NODELAY: h11 writes headers and body separately; with Nagle + delayed ACK every
        # request would wait ~40 ms for the server's ACK.
        verify = credentials.ssl_context if url.tls else True
        nodelay = httpx.HTTPTransport(verify=verify, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._http = httpx.Client(transport=nodelay, headers={"host": str(address), **credentials.http_headers})

    def _url(self, path: str) -> str:
        if self._tls:  # TLS needs the name, not the address
            return f"{self.base_url}{path}"
        with self._lock:
            if time.monotonic() - self._resolved_at > self._resolve_every_s or not self._addresses:
                try:
                    infos = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
                except socket.gaierror as exc:
                    raise TransientError(f"cannot resolve {self._host}: {exc}") from None
                self._addresses = sorted({f"[{i[4][0]}]" if i[0] == socket.AF_INET6 else i[4][0] for i in infos})
                self._resolved_at = time.monotonic()
            address = self._addresses[next(self._next) % len(self._addresses)]
        return f"http://{address}:{self._port}{path}"

    def request(self, method: str, path: str, timeout_s: float, body: dict | None = None) -> dict:
        try:
            # The service admits a request only if it can answer within this deadline (else 429 at once).
            deadline = {DEADLINE_HEADER: str(max(1, int(timeout_s * 1000)))}
            response = self._http.request(method, self._url(path), json=body, timeout=timeout_s, headers=deadline)
        except httpx.TimeoutException as exc:
            raise RewardServiceError("DEADLINE_EXCEEDED", f"no answer within {timeout_s}s: {exc}") from None
        except httpx.TransportError as exc:
            raise TransientError(f"{type(exc).__name__}: {exc}") from None
        if response.status_code == 429:
            raise OverloadedError(f"HTTP 429: {response.text[:500]}", _retry_after(response.headers.get("retry-after")))
        if response.status_code in _RETRYABLE_HTTP:
            raise TransientError(f"HTTP {response.status_code}: {response.text[:500]}")
        if response.status_code != 200:
            try:
                error = response.json()["error"]
                raise RewardServiceError(error["code"], error["message"])
            except (ValueError, KeyError, TypeError):
                raise RewardServiceError(f"HTTP_{response.status_code}", response.text[:500]) from None
        return response.json()

    def score(self, samples: Sequence[Sample], mode: Mode, timeout_s: float) -> list[Result]:
        body = {
            "mode": mode.value,
            "samples": [
                {
                    "image": {"data": base64.b64encode(s.image).decode(), "format": s.image_format.value},
                    "prompt": s.prompt,
                    "group_id": s.group_id,
                    "metadata": dict(s.metadata),
                }
                for s in samples
            ],
        }
        out = self.request("POST", "/v1/score", timeout_s, body)
        return [
            Result(
                outcome=Outcome(r["outcome"]),
                score=r.get("score"),
                error=r.get("error") or "",
                details=r.get("details", {}),
            )
            for r in out["results"]
        ]

    def info(self, timeout_s: float) -> ServiceInfo:
        out = self.request("GET", "/v1/info", timeout_s)
        return ServiceInfo(
            name=out["name"],
            version=out["version"],
            api=out["api"],
            backend=out["backend"],
            limits=Limits(**out["limits"]),
            capabilities=tuple(Mode(c) for c in out["capabilities"]),
        )

    def close(self) -> None:
        self._http.close()
