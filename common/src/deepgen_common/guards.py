"""What every API request passes through on either transport before its handler runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
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
    # Bodies of unknown size are read one at a time: a chunked HTTP body keeps the lock until its bytes
    # are in the budget, a gRPC message is read inside a hold for a largest one. So at most one body is in
    # memory beyond what the budget counts, and one message's reading copies at a time.
    reading: asyncio.Lock = field(default_factory=asyncio.Lock)
    precheck: Callable[[float], None] | None = None  # Component.precheck

    @classmethod
    def from_settings(cls, settings: ServiceSettings, precheck: Callable[[float], None] | None = None) -> Guards:
        token = settings.api_token.get_secret_value() if settings.api_token is not None else None
        return cls(settings, Drain(), TokenCheck(token), ByteBudget(settings.inflight_bytes), precheck=precheck)

    def admit_early(self, remaining_s: float) -> None:
        """Before a body is read: raise Overloaded when the service could not start the request in time."""
        if self.precheck is not None:
            self.precheck(remaining_s)
