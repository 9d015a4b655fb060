"""Deployment settings every service shares, read from the environment in one place."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deepgen_common.types import Limits

MiB = 1024 * 1024


class ServiceSettings(BaseSettings):
    """Ports, limits and logging of a service. Each service subclasses it to add its own knobs and
    to set its default ports; every field is read from the upper-case environment variable of the
    same name (`HTTP_PORT`, `MAX_BATCH_SIZE`, ...)."""

    # The process environment holds unrelated variables too, so unknown names are ignored.
    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    host: str = Field("0.0.0.0", description="Address both servers bind to.")
    http_port: int = Field(ge=0, le=65535, description="HTTP/JSON port; 0 picks a free one.")
    grpc_port: int = Field(ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    max_batch_size: int = Field(64, ge=1, description="Most samples in one request.")
    max_image_bytes: int = Field(16 * MiB, ge=1, description="Most encoded bytes of one image.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Most pixels of one decoded image.")
    max_request_bytes: int = Field(64 * MiB, ge=1024, description="Most bytes of one gRPC message or HTTP body.")
    max_queued_samples: int = Field(512, ge=1, description="Samples admitted but not answered before 429.")
    shutdown_grace_s: float = Field(10.0, ge=0, description="Seconds in-flight requests get after SIGTERM.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"

    @model_validator(mode="after")
    def _check_limits(self) -> ServiceSettings:
        if self.max_queued_samples < self.max_batch_size:
            raise ValueError(
                f"MAX_QUEUED_SAMPLES ({self.max_queued_samples}) must be >= MAX_BATCH_SIZE ({self.max_batch_size}), "
                "or a full-size request could never be admitted"
            )
        if self.max_image_bytes > self.max_request_bytes:
            raise ValueError(
                f"MAX_IMAGE_BYTES ({self.max_image_bytes}) must be <= MAX_REQUEST_BYTES ({self.max_request_bytes})"
            )
        return self

    @property
    def limits(self) -> Limits:
        return Limits(
            max_batch_size=self.max_batch_size,
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
            max_request_bytes=self.max_request_bytes,
            max_queued_samples=self.max_queued_samples,
        )
