"""API_TOKEN and TLS on both servers of a real reward-ocr (issue 8, finding 10), with a CA and
certificates made by the project's own `scripts/make_certs.py`. Raw httpx and gRPC channels carry the
credentials (the project's clients get their own end-to-end tests)."""

from __future__ import annotations

import importlib.util
import ssl
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deepgen.common.v1 import types_pb2
from deepgen.reward.v1 import reward_pb2
from deepgen_common.reward_api import reward_component
from reward_ocr.backend import OcrBackend
from reward_ocr.settings import OcrSettings
from tests.conftest import ocr_settings
from tests.helpers import REPO, ServiceThread

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token-for-tests"
INFO = "/deepgen.reward.v1.RewardService/GetInfo"


def load_make_certs():
    spec = importlib.util.spec_from_file_location("make_certs", REPO / "scripts" / "make_certs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory):
    return load_make_certs().make_certs(tmp_path_factory.mktemp("certs"), ["reward-host.test", "10.9.8.7"])


def start(**overrides: object) -> ServiceThread:
    return ServiceThread(
        ocr_settings(ocr_executor="thread", ocr_workers=1, **overrides), reward_component(OcrBackend)
    ).start()


def test_host_defaults_to_loopback():
    assert OcrSettings(http_port=0, grpc_port=0).host == "127.0.0.1"


def test_certificates_name_every_host(certs):
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    compose_names = {"reward-ocr", "reward-unified", "eval-unigenbench"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"reward-host.test", *compose_names, "localhost"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.9.8.7", "127.0.0.1"}
    for key in (certs.ca_key, certs.server_key, certs.client_key, certs.prometheus_key):
        assert key.stat().st_mode & 0o077 == 0, key  # private keys are not world-readable
    with pytest.raises(FileExistsError, match="--force"):
        load_make_certs().make_certs(certs.ca_cert.parent, ["x"])


@pytest.fixture(scope="module")
def token_service():
    service = start(api_token=TOKEN)
    yield service
    service.stop()


@pytest.mark.parametrize(
    ("authorization", "status"),
    [(None, 401), ("Bearer wrong", 401), (f"Bearer {TOKEN}x", 401), (f"Bearer {TOKEN}", 200)],
)
def test_http_api_needs_the_token(token_service, authorization: str | None, status: int):
    headers = {"authorization": authorization} if authorization else {}
    response = httpx.get(f"{token_service.http_url}/v1/info", headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.json()["error"]["code"] == "UNAUTHENTICATED"
        assert response.headers["www-authenticate"] == "Bearer"


def test_health_readiness_and_metrics_stay_open(token_service):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{token_service.http_url}{path}").status_code == 200, path
    with grpc.insecure_channel(f"127.0.0.1:{token_service.grpc_port}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_api_needs_the_token(token_service):
    info = types_pb2.GetInfoRequest().SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{token_service.grpc_port}") as channel:
        call = channel.unary_unary(INFO)
        with pytest.raises(grpc.RpcError) as missing:
            call(info, timeout=10)
        assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            call(info, timeout=10, metadata=[("authorization", "Bearer nope")])
        assert wrong.value.code() is grpc.StatusCode.UNAUTHENTICATED
        answer = types_pb2.ServiceInfo.FromString(
            call(info, timeout=10, metadata=[("authorization", f"Bearer {TOKEN}")])
        )
    assert answer.name == "reward-ocr"


def test_tls_and_token_on_both_transports(certs):
    service = start(api_token=TOKEN, tls_cert_file=certs.server_cert, tls_key_file=certs.server_key)
    auth = {"authorization": f"Bearer {TOKEN}"}
    try:
        url = f"https://localhost:{service.http_port}"
        with httpx.Client(verify=ssl.create_default_context(cafile=certs.ca_cert)) as client:
            assert client.get(f"{url}/v1/info", headers=auth).json()["name"] == "reward-ocr"
            assert client.get(f"{url}/v1/info").status_code == 401
        with pytest.raises(httpx.HTTPError):  # the server speaks TLS only
            httpx.get(f"http://127.0.0.1:{service.http_port}/healthz", timeout=5)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA refuses the server
            httpx.get(f"{url}/healthz", timeout=5)
        credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca_cert.read_bytes())
        with grpc.secure_channel(f"localhost:{service.grpc_port}", credentials) as channel:
            raw = channel.unary_unary(INFO)(types_pb2.GetInfoRequest().SerializeToString(), metadata=list(auth.items()))
            assert types_pb2.ServiceInfo.FromString(raw).name == "reward-ocr"
        with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as plain, pytest.raises(grpc.RpcError) as info:
            plain.unary_unary(INFO)(types_pb2.GetInfoRequest().SerializeToString(), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        service.stop()


def test_mutual_tls_needs_a_client_certificate(certs):
    service = start(tls_cert_file=certs.server_cert, tls_key_file=certs.server_key, tls_client_ca_file=certs.ca_cert)
    try:
        url = f"https://localhost:{service.http_port}/healthz"
        anonymous = ssl.create_default_context(cafile=certs.ca_cert)
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=anonymous, timeout=5)
        with_cert = ssl.create_default_context(cafile=certs.ca_cert)
        with_cert.load_cert_chain(certs.client_cert, certs.client_key)
        assert httpx.get(url, verify=with_cert).status_code == 200
        request = reward_pb2.ScoreRequest()  # empty: INVALID_ARGUMENT proves the call got through TLS
        ca = certs.ca_cert.read_bytes()
        anonymous_grpc = grpc.ssl_channel_credentials(root_certificates=ca)
        with grpc.secure_channel(f"localhost:{service.grpc_port}", anonymous_grpc) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary("/deepgen.reward.v1.RewardService/Score")(request.SerializeToString(), timeout=5)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        mutual = grpc.ssl_channel_credentials(ca, certs.client_key.read_bytes(), certs.client_cert.read_bytes())
        with grpc.secure_channel(f"localhost:{service.grpc_port}", mutual) as channel:
            with pytest.raises(grpc.RpcError) as invalid:
                channel.unary_unary("/deepgen.reward.v1.RewardService/Score")(request.SerializeToString(), timeout=10)
            assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        service.stop()


def test_probe_follows_the_security_mode(certs):
    from deepgen_common.probe import ProbeSettings, probe

    service = start(tls_cert_file=certs.server_cert, tls_key_file=certs.server_key, tls_client_ca_file=certs.ca_cert)
    try:
        settings = ProbeSettings(
            http_port=service.http_port,
            tls_cert_file=certs.server_cert,
            tls_key_file=certs.server_key,
            tls_client_ca_file=certs.ca_cert,
        )
        assert probe(settings)
        assert not probe(ProbeSettings(http_port=service.http_port))  # plain HTTP to a TLS server
    finally:
        service.stop()


def test_tls_settings_are_checked(tmp_path: Path, certs):
    with pytest.raises(ValueError, match="TLS_CERT_FILE and TLS_KEY_FILE go together"):
        ocr_settings(tls_cert_file=certs.server_cert)
    with pytest.raises(
        ValueError, match=r"TLS_KEY_FILE \(.*missing.pem\) is not a readable file; make one with `make certs`"
    ):
        ocr_settings(tls_cert_file=certs.server_cert, tls_key_file=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="API_TOKEN is set but empty"):
        ocr_settings(api_token=" ")
