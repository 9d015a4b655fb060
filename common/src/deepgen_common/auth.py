"""Bearer-token check shared by both transports (API_TOKEN)."""

from __future__ import annotations

import hmac

from deepgen_common.errors import Unauthenticated


class TokenCheck:
    """Accepts `Bearer <API_TOKEN>`, compared in constant time; accepts everything when no token is set."""

    def __init__(self, token: str | None) -> None:
        self._expected = f"Bearer {token}".encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._expected is not None

    def check(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless `authorization` (the header / metadata value) carries the token."""
        if self._expected is None:
            return
        if authorization is None:
            raise Unauthenticated("missing authorization: send 'Authorization: Bearer <API_TOKEN>'")
        if not hmac.compare_digest(authorization.encode("utf-8", "surrogateescape"), self._expected):
            raise Unauthenticated("invalid bearer token: send 'Authorization: Bearer <API_TOKEN>'")
