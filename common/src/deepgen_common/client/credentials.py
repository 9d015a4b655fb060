"""What a client presents to a service: the bearer token and the TLS trust roots (and, for mutual
TLS, its own certificate). Read from the environment in one place:

    API_TOKEN             bearer token sent on every API call (HTTP `Authorization`, gRPC
                          `authorization` metadata); health and readiness probes go without it
    TLS_CA_FILE           PEM trust roots for `https://` / `grpcs://` (default: the system's roots)
    TLS_CLIENT_CERT_FILE  PEM certificate chain of this client, for services that require mutual TLS
    TLS_CLIENT_KEY_FILE   its private key
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import grpc


@dataclass(frozen=True)
class ClientCredentials:
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both TLS_CLIENT_CERT_FILE and TLS_CLIENT_KEY_FILE (mutual TLS), or neither")
        for name, path in (
            ("TLS_CA_FILE", self.ca_file),
            ("TLS_CLIENT_CERT_FILE", self.cert_file),
            ("TLS_CLIENT_KEY_FILE", self.key_file),
        ):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}={path!r} is not a readable file")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("API_TOKEN must be non-empty and contain no whitespace")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ClientCredentials:
        """Credentials from `API_TOKEN`, `TLS_CA_FILE`, `TLS_CLIENT_CERT_FILE`, `TLS_CLIENT_KEY_FILE`
        (unset or empty variables mean none)."""
        return cls(
            token=environ.get("API_TOKEN") or None,
            ca_file=environ.get("TLS_CA_FILE") or None,
            cert_file=environ.get("TLS_CLIENT_CERT_FILE") or None,
            key_file=environ.get("TLS_CLIENT_KEY_FILE") or None,
        )

    @property
    def grpc_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    @property
    def http_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS: the configured roots (else the system's) and the client certificate, if any."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def grpc_channel_credentials(self) -> grpc.ChannelCredentials:
        """For gRPC over TLS: the configured roots (else gRPC's bundled ones) and the client certificate."""

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )
