"""The project's own clients (`RewardClient`, `is_ready`) against a real reward-ocr with a token and
TLS on both transports, mutual TLS included; the CA and certificates come from `make_certs`."""

from __future__ import annotations

import pytest

from deepgen_common.client import (
    ClientCredentials,
    RetryPolicy,
    RewardClient,
    RewardServiceError,
    TransientError,
    is_ready,
    wait_ready,
)
from deepgen_common.reward_api import reward_component
from deepgen_common.types import Sample
from reward_ocr.backend import OcrBackend
from tests.common.test_auth_tls import load_make_certs
from tests.conftest import ocr_settings
from tests.helpers import ServiceThread, render_text

pytestmark = pytest.mark.integration

TOKEN = "client-side-token"
SAMPLE = Sample(render_text(["SECURE"]), 'a sign "SECURE"')
ONE_TRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):
    return load_make_certs().make_certs(tmp_path_factory.mktemp("certs"), ["reward-host.test"])


def start_secure_ocr(certs, token: str) -> ServiceThread:
    """reward-ocr with token + TLS + mutual TLS (every client needs the CA, a client certificate and the
    token), once ready; the readiness probe goes over TLS with a client certificate and no token."""
    settings = ocr_settings(
        ocr_executor="thread",
        ocr_workers=1,
        api_token=token,
        tls_cert_file=certs.server_cert,
        tls_key_file=certs.server_key,
        tls_client_ca_file=certs.ca_cert,
    )
    service = ServiceThread(settings, reward_component(OcrBackend)).start(wait_ready=False)
    probe = ClientCredentials(
        ca_file=str(certs.ca_cert), cert_file=str(certs.client_cert), key_file=str(certs.client_key)
    )
    wait_ready(f"https://localhost:{service.http_port}", credentials=probe)
    return service


@pytest.fixture(scope="module")
def secure_service(certs):
    service = start_secure_ocr(certs, TOKEN)
    yield service
    service.stop()


def urls(service: ServiceThread) -> dict[str, str]:
    return {
        "grpcs": f"grpcs://localhost:{service.grpc_port}",
        "https": f"https://127.0.0.1:{service.http_port}",  # an IP address in the certificate's names
    }


def full(certs) -> ClientCredentials:
    return ClientCredentials(
        token=TOKEN, ca_file=str(certs.ca_cert), cert_file=str(certs.client_cert), key_file=str(certs.client_key)
    )


@pytest.mark.parametrize("scheme", ["grpcs", "https"])
def test_reward_client_scores_over_tls_with_token_and_client_certificate(secure_service, certs, scheme: str):
    url = urls(secure_service)[scheme]
    assert is_ready(url, credentials=full(certs))
    with RewardClient(url, credentials=full(certs), retry=ONE_TRY) as client:
        [result] = client.score([SAMPLE])
    assert result.score == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("scheme", ["grpcs", "https"])
def test_missing_token_is_unauthenticated(secure_service, certs, scheme: str):
    no_token = ClientCredentials(
        ca_file=str(certs.ca_cert), cert_file=str(certs.client_cert), key_file=str(certs.client_key)
    )
    client = RewardClient(urls(secure_service)[scheme], credentials=no_token, retry=ONE_TRY)
    with client, pytest.raises(RewardServiceError) as error:
        client.info()
    assert error.value.code == "UNAUTHENTICATED"


@pytest.mark.parametrize("scheme", ["grpcs", "https"])
@pytest.mark.parametrize("missing", ["ca", "client certificate"])
def test_tls_failures_are_transport_errors(secure_service, certs, scheme: str, missing: str):
    creds = (
        ClientCredentials(token=TOKEN, cert_file=str(certs.client_cert), key_file=str(certs.client_key))
        if missing == "ca"
        else ClientCredentials(token=TOKEN, ca_file=str(certs.ca_cert))
    )
    url = urls(secure_service)[scheme]
    assert not is_ready(url, timeout_s=5, credentials=creds)
    with RewardClient(url, credentials=creds, retry=ONE_TRY, timeout_s=10) as client, pytest.raises(TransientError):
        client.info()


def test_credentials_come_from_the_environment(secure_service, certs, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("API_TOKEN", TOKEN)
    monkeypatch.setenv("TLS_CA_FILE", str(certs.ca_cert))
    monkeypatch.setenv("TLS_CLIENT_CERT_FILE", str(certs.client_cert))
    monkeypatch.setenv("TLS_CLIENT_KEY_FILE", str(certs.client_key))
    with RewardClient(urls(secure_service)["grpcs"], retry=ONE_TRY) as client:
        assert client.info().name == "reward-ocr"
