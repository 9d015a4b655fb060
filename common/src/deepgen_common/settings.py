"""Deployment settings every service shares, read from the environment in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deepgen_common.types import Limits

MiB = 1024 * 1024


class ServiceSettings(BaseSettings):
    """Ports, limits, security and logging of a service. Each service subclasses it to add its own
    knobs and to set its default ports; every field is read from the upper-case environment variable
    of the same name (`HTTP_PORT`, `MAX_BATCH_SIZE`, ...)."""

    # The process environment holds unrelated variables too, so unknown names are ignored; an empty
    # variable (compose passes `API_TOKEN: ${API_TOKEN:-}`) counts as unset.
    model_config = SettingsConfigDict(extra="ignore", frozen=True, env_ignore_empty=True)

    host: str = Field(
        "127.0.0.1",
        description="Address both servers bind to; 0.0.0.0 only behind API_TOKEN + TLS or a private network.",
    )
    http_port: int = Field(ge=0, le=65535, description="HTTP/JSON port; 0 picks a free one.")
    grpc_port: int = Field(ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    max_batch_size: int = Field(64, ge=1, description="Most samples in one request.")
    max_image_bytes: int = Field(16 * MiB, ge=1, description="Most encoded bytes of one image.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Most pixels of one decoded image.")
    max_request_bytes: int = Field(
        64 * MiB,
        ge=1024,
        description="Most bytes of one HTTP body; a gRPC message may have 2/3 of it.",
    )
    max_inflight_bytes: int = Field(
        0,
        ge=0,
        description="Most request-body bytes held by requests being read, decoded or scored at once; a request "
        "waits for room (up to MAX_QUEUE_WAIT_S) before its body is read. 0: MAX_REQUEST_BYTES.",
    )
    max_queued_samples: int = Field(512, ge=1, description="Most samples admitted and not answered (a memory bound).")
    default_deadline_s: float = Field(
        60.0, gt=0, description="Deadline of a request that names none (gRPC deadline, HTTP x-request-timeout-ms)."
    )
    max_queue_wait_s: float = Field(
        30.0, gt=0, description="Longest predicted wait before a request's first sample starts; beyond it 429."
    )
    header_read_timeout_s: float = Field(10.0, gt=0, description="Seconds a connection gets to send request headers.")
    body_read_timeout_s: float = Field(30.0, gt=0, description="Seconds a request gets to send its whole body.")
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="Seconds from SIGTERM to exit; in-flight requests finish or get 503."
    )
    api_token: SecretStr | None = Field(
        None, description="Bearer token every API call must present (health and /metrics stay open); unset: no auth."
    )
    tls_cert_file: Path | None = Field(None, description="PEM server certificate (chain): both servers serve TLS only.")
    tls_key_file: Path | None = Field(None, description="PEM private key of TLS_CERT_FILE.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: clients must present a certificate it signed."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @model_validator(mode="after")
    def _check_limits(self) -> ServiceSettings:
        if self.max_queued_samples < self.max_batch_size:
            raise ValueError(
                f"MAX_QUEUED_SAMPLES ({self.max_queued_samples}) must be >= MAX_BATCH_SIZE ({self.max_batch_size}), "
                "or a full-size request could never be admitted"
            )
        if self.max_image_bytes > self.max_grpc_message_bytes:
            raise ValueError(
                f"MAX_IMAGE_BYTES ({self.max_image_bytes}) must be <= 2/3 of MAX_REQUEST_BYTES "
                f"({self.max_request_bytes}), so that a largest image fits a request as base64 over HTTP and in a "
                "gRPC message"
            )
        if 0 < self.max_inflight_bytes < self.max_request_bytes:
            raise ValueError(
                f"MAX_INFLIGHT_BYTES ({self.max_inflight_bytes}) must be 0 or >= MAX_REQUEST_BYTES "
                f"({self.max_request_bytes}), or a full-size request could never be read"
            )
        if self.api_token is not None and not self.api_token.get_secret_value().strip():
            raise ValueError("API_TOKEN is set but empty: unset it to disable auth, or set a long random token")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS_CERT_FILE and TLS_KEY_FILE go together: set both to serve TLS, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("TLS_CLIENT_CA_FILE (mutual TLS) needs TLS_CERT_FILE and TLS_KEY_FILE too")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name.upper()} ({path}) is not a readable file; make one with `make certs`")
        return self

    @property
    def inflight_bytes(self) -> int:
        """MAX_INFLIGHT_BYTES with its default resolved."""
        return self.max_inflight_bytes or self.max_request_bytes

    @property
    def max_grpc_message_bytes(self) -> int:
        """The largest gRPC request message. grpcio holds a message three times while it reads it (the
        core's slices, a bytearray, the bytes it returns), so a largest message costs about twice
        MAX_REQUEST_BYTES, as a largest HTTP body does; its images are 8/9 of that body's (no base64)."""
        return self.max_request_bytes * 2 // 3

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def limits(self) -> Limits:
        return Limits(
            max_batch_size=self.max_batch_size,
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
            max_request_bytes=self.max_request_bytes,
            max_queued_samples=self.max_queued_samples,
        )
