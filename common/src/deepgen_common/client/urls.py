"""Service URLs, parsed in one place for every client (reward, eval, readiness, the trainer).

The forms a `*_URL` takes:

    http://host:port        HTTP/JSON                 https://host:port   HTTP/JSON over TLS
    grpc://host:port        gRPC                      grpcs://host:port   gRPC over TLS
    dns:///host:port, ipv4:a:p,b:q, ipv6:..., unix:path   gRPC's own target syntax (plaintext), as is

Every scheme form may list several addresses, comma-separated (`grpc://h1:50051,h2:50051`,
`http://127.0.0.1:18090,127.0.0.1:18091`): clients spread requests round-robin over them and fail
over to the next address when one is unreachable. A host name in any form stands for every address
it resolves to (gRPC's and the HTTP transport's own round-robin over DNS, which covers compose
replicas behind one service name).

Credentials, paths, queries and fragments are refused: the token comes from `API_TOKEN`, never
from a URL that ends up in logs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

Protocol = Literal["http", "grpc"]

_SCHEMES: dict[str, tuple[Protocol, bool]] = {
    "http": ("http", False),
    "https": ("http", True),
    "grpc": ("grpc", False),
    "grpcs": ("grpc", True),
}
_DEFAULT_HTTP_PORTS = {False: 80, True: 443}
_GRPC_NATIVE_PREFIXES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")
_FORMS = (
    "use http://host:port or https://host:port (HTTP/JSON), grpc://host:port or grpcs://host:port (gRPC), "
    "optionally with several comma-separated addresses (grpc://h1:50051,h2:50051)"
)


@dataclass(frozen=True)
class Address:
    """One `host:port`; IPv6 hosts are kept without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServiceURL:
    """A parsed service URL: which API, whether over TLS, and one or more addresses.

    `native` holds a gRPC target in gRPC's own syntax (`dns:///...`, `ipv4:...`, `unix:...`), which
    is passed to gRPC unchanged; `addresses` is then empty.
    """

    protocol: Protocol
    tls: bool
    addresses: tuple[Address, ...] = ()
    native: str | None = None

    @property
    def scheme(self) -> str:
        return {("http", False): "http", ("http", True): "https", ("grpc", False): "grpc", ("grpc", True): "grpcs"}[
            (self.protocol, self.tls)
        ]

    def __str__(self) -> str:
        if self.native is not None:
            return self.native
        return f"{self.scheme}://{','.join(str(a) for a in self.addresses)}"

    def split(self) -> list[ServiceURL]:
        """One URL per address (a native gRPC target stays whole: gRPC balances it itself)."""
        if self.native is not None:
            return [self]
        return [ServiceURL(self.protocol, self.tls, (a,)) for a in self.addresses]

    @property
    def grpc_target(self) -> str:
        """The target string gRPC dials: `dns:///host:port` resolves the name and balances over every
        address it has (compose replicas behind one service name)."""
        if self.protocol != "grpc":
            raise ValueError(f"{self} is not a gRPC URL")
        if self.native is not None:
            return self.native
        (address,) = self._single()
        return f"dns:///{address}"

    @property
    def base_url(self) -> str:
        """`http(s)://host:port` of a one-address HTTP URL."""
        if self.protocol != "http":
            raise ValueError(f"{self} is not an HTTP URL")
        (address,) = self._single()
        return f"{self.scheme}://{address}"

    def _single(self) -> tuple[Address]:
        if len(self.addresses) != 1:
            raise ValueError(f"{self} lists {len(self.addresses)} addresses; split() it first")
        return (self.addresses[0],)


def parse_service_url(url: str) -> ServiceURL:
    """Parse a service URL of one of the module's forms; ValueError naming the URL and the fix."""
    text = url.strip()
    if text.startswith(_GRPC_NATIVE_PREFIXES):
        return ServiceURL("grpc", False, native=text)
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ValueError(f"unsupported service URL {url!r}: {_FORMS}")
    protocol, tls = _SCHEMES[scheme.lower()]
    netloc = rest.rstrip("/")
    if not netloc:
        raise ValueError(f"service URL {url!r} names no address: {_FORMS}")
    if any(c in netloc for c in "/?#@"):
        raise ValueError(
            f"service URL {url!r} has a path, query, fragment or credentials; give only addresses "
            "(the token goes in API_TOKEN)"
        )
    addresses = tuple(_parse_address(part, protocol, tls, url) for part in netloc.split(","))
    if len(set(addresses)) != len(addresses):
        raise ValueError(f"service URL {url!r} lists an address twice")
    return ServiceURL(protocol, tls, addresses)


def _parse_address(part: str, protocol: Protocol, tls: bool, url: str) -> Address:
    part = part.strip()
    if not part:
        raise ValueError(f"service URL {url!r} has an empty address in its list")
    try:
        parts = urlsplit(f"//{part}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # bad port, unbalanced brackets
        raise ValueError(f"service URL {url!r}: bad address {part!r} ({exc})") from None
    if not host:
        raise ValueError(f"service URL {url!r}: address {part!r} has no host")
    if host.startswith("[") or (":" in host and not _is_ipv6(host)):
        raise ValueError(f"service URL {url!r}: bad host in {part!r}")
    if port is None:
        if protocol == "grpc":
            raise ValueError(f"service URL {url!r}: address {part!r} needs a port (grpc://host:port)")
        port = _DEFAULT_HTTP_PORTS[tls]
    if port == 0:
        raise ValueError(f"service URL {url!r}: port 0 in {part!r} is not an address to dial")
    return Address(host, port)


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False
