"""`python -m deepgen_common.probe`: the container healthcheck. Exits 0 when the service on this host
answers 200 on /readyz, else 1. It speaks HTTPS when the service serves TLS, presenting the service's
own certificate when mutual TLS is on (`make certs` issues it for server and client use), so the
probe works in every security mode."""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class ProbeSettings(BaseSettings):
    """The service's own port and TLS files, from the same environment variables it reads."""

    model_config = SettingsConfigDict(extra="ignore", env_ignore_empty=True)

    http_port: int
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None


def probe(settings: ProbeSettings, timeout_s: float = 4.0) -> bool:
    """True when /readyz on 127.0.0.1 answers 200."""
    context = None
    scheme = "http"
    if settings.tls_cert_file is not None:
        scheme = "https"
        # Loopback to our own server: its identity is not in question, only its readiness.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if settings.tls_client_ca_file is not None and settings.tls_key_file is not None:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    try:
        url = f"{scheme}://127.0.0.1:{settings.http_port}/readyz"
        with urllib.request.urlopen(url, timeout=timeout_s, context=context):  # noqa: S310 (http or https)
            return True
    except (urllib.error.URLError, OSError):
        return False


if __name__ == "__main__":
    sys.exit(0 if probe(ProbeSettings()) else 1)  # type: ignore[call-arg]
