"""Service URLs as the original DeepGen-RL wrote them.

- ``host:port`` (no scheme, as the original's reward clients accepted) means ``http://host:port``;
  several comma-separated addresses likewise. gRPC's own target forms (``dns:``, ``ipv4:``, ``unix:``
  ...) keep their meaning.
- A reward URL whose variable is not set at all defaults to the original's local address
  (``OCR_URL`` http://localhost:18082, ``UNIFIEDREWARD_THINK_URL`` http://localhost:18087, which are
  reward-ocr's and reward-unified's HTTP ports). A variable set but empty (compose's way of turning a
  reward or the evaluation off) stays off. ``UNIGENBENCH_API_URL``'s http://localhost:8000 default
  is the original launcher's (``scripts/train.sh``), not its entry point's, and so it is here.

Imports nothing of the trainer.
"""

from __future__ import annotations

from collections.abc import Mapping

ORIGINAL_URL_DEFAULTS: dict[str, str] = {
    "OCR_URL": "http://localhost:18082",
    "UNIFIEDREWARD_THINK_URL": "http://localhost:18087",
}
_NATIVE_GRPC_PREFIXES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


def with_scheme(url: str) -> str:
    """``host:port[,host:port...]`` → ``http://...``; any other form unchanged."""
    url = url.strip()
    if not url or "://" in url or url.startswith(_NATIVE_GRPC_PREFIXES):
        return url
    return f"http://{url}"


def unset_url_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The original's default address of each reward URL variable absent from ``environ``."""
    return {var: url for var, url in ORIGINAL_URL_DEFAULTS.items() if var not in environ}
