"""What every API request passes through on either transport before its handler runs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from deepgen_common.admission import ByteBudget
from deepgen_common.auth import TokenCheck
from deepgen_common.drain import Drain
from deepgen_common.settings import ServiceSettings


@dataclass(frozen=True)
class Guards:
    """The drain (503 once SIGTERM came), the bearer-token check, the in-flight byte budget, the lock
    for reading bodies of unknown size and the settings with the deadline default and read timeouts;
    one instance per service, shared by both transports."""

    settings: ServiceSettings
    drain: Drain
    token: TokenCheck
    budget: ByteBudget
    # Bodies of unknown size (gRPC messages, chunked HTTP) are read one at a time: at most one
    # MAX_REQUEST_BYTES body is in memory beyond what the budget counts.
    reading: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> Guards:
        token = settings.api_token.get_secret_value() if settings.api_token is not None else None
        return cls(settings, Drain(), TokenCheck(token), ByteBudget(settings.inflight_bytes))
