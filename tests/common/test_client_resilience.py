"""The reward client against real reward-ocr replicas that restart, die and come back.

Replicas run the real OCR engine in one thread each (the lightest real configuration), so starting
and stopping them takes about a second.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deepgen_common.client import BreakerState, CircuitBreaker, CircuitOpenError, RetryPolicy, RewardClient
from deepgen_common.client.transports import TransientError
from deepgen_common.reward_api import reward_component
from deepgen_common.types import Sample
from reward_ocr.backend import OcrBackend
from tests.common.test_client_units import closed_port
from tests.conftest import ocr_settings
from tests.helpers import ServiceThread, render_text

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGE = render_text(["REPLICA"])
SAMPLE = Sample(IMAGE, 'a sign "REPLICA"')


def replica(grpc_port: int = 0, http_port: int = 0) -> ServiceThread:
    settings = ocr_settings(
        ocr_executor="thread", ocr_workers=1, grpc_port=grpc_port, http_port=http_port, shutdown_grace_s=1.0
    )
    return ServiceThread(settings, reward_component(OcrBackend)).start()


def score_requests(service: ServiceThread) -> float:
    text = httpx.get(f"{service.http_url}/metrics").text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "deepgen_requests_total" and s.labels.get("method") in ("Score", "/v1/score")
    )


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_client_survives_a_server_restart(transport: str):
    server = replica()
    ports = server.grpc_port, server.http_port
    url = server.grpc_url if transport == "grpc" else server.http_url
    client = RewardClient(
        url,
        # ~60 s of retries: the restarted replica loads its OCR engine first, slowly on a busy machine.
        retry=RetryPolicy(max_attempts=240, initial_s=0.1, max_s=0.5),
        breaker=CircuitBreaker(url, failure_threshold=1000),
    )
    try:
        assert client.score([SAMPLE])[0].score == pytest.approx(1.0, abs=0.05)
        server.stop()
        restarted: list[ServiceThread] = []
        threading.Timer(1.0, lambda: restarted.append(replica(*ports))).start()
        # Sent while nothing listens: UNAVAILABLE / connection refused, then 503 while loading, then OK.
        [result] = client.score([SAMPLE])
        assert result.score == pytest.approx(1.0, abs=0.05)
    finally:
        client.close()
        for s in restarted:
            s.stop()


def test_load_is_spread_over_replicas_and_one_dying_loses_nothing():
    a, b = replica(), replica()
    target = f"ipv4:127.0.0.1:{a.grpc_port},127.0.0.1:{b.grpc_port}"
    client = RewardClient(target, retry=RetryPolicy(max_attempts=5, initial_s=0.05, max_s=0.2))
    try:
        for _ in range(10):
            assert client.score([SAMPLE])[0].score == pytest.approx(1.0, abs=0.05)
        per_replica = score_requests(a), score_requests(b)
        assert sum(per_replica) == 10
        assert min(per_replica) >= 3, per_replica  # round robin: 5/5 give or take connection start-up
        a.stop()
        results = [client.score([SAMPLE])[0] for _ in range(6)]
        assert all(r.score == pytest.approx(1.0, abs=0.05) for r in results)
        assert score_requests(b) >= per_replica[1] + 6
    finally:
        client.close()
        b.stop()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_address_list_balances_and_survives_a_dead_address(transport: str):
    """`grpc://a,b,dead` (and http): requests spread over the live replicas, the dead address and
    then a replica stopped mid-way cost no request (failover, no retry with backoff needed)."""
    a, b = replica(), replica()
    port = (lambda s: s.grpc_port) if transport == "grpc" else (lambda s: s.http_port)
    url = f"{transport}://127.0.0.1:{port(a)},127.0.0.1:{closed_port()},127.0.0.1:{port(b)}"
    client = RewardClient(url, retry=RetryPolicy(max_attempts=1))
    try:
        for _ in range(12):
            assert client.score([SAMPLE])[0].score == pytest.approx(1.0, abs=0.05)
        per_replica = score_requests(a), score_requests(b)
        assert sum(per_replica) == 12
        assert min(per_replica) >= 4, per_replica
        a.stop()
        for _ in range(6):
            assert client.score([SAMPLE])[0].score == pytest.approx(1.0, abs=0.05)
        assert score_requests(b) == per_replica[1] + 6
    finally:
        client.close()
        b.stop()


def test_address_list_with_every_address_down_names_each():
    url = f"grpc://127.0.0.1:{closed_port()},127.0.0.1:{closed_port()}"
    with (
        RewardClient(url, retry=RetryPolicy(max_attempts=1)) as client,
        pytest.raises(TransientError, match=r"all 2 addresses failed: grpc://127.0.0.1:\d+: .*; grpc://"),
    ):
        client.info()


def test_breaker_opens_when_every_replica_is_down_then_recovers():
    a, b = replica(), replica()
    ports = a.grpc_port, a.http_port
    target = f"ipv4:127.0.0.1:{a.grpc_port},127.0.0.1:{b.grpc_port}"
    breaker = CircuitBreaker(target, failure_threshold=3, reset_after_s=1.0)
    client = RewardClient(target, retry=RetryPolicy(max_attempts=3, initial_s=0.05, max_s=0.1), breaker=breaker)
    revived: list[ServiceThread] = []
    try:
        assert client.score([SAMPLE])[0].outcome.value == "OK"
        a.stop()
        b.stop()
        with pytest.raises(TransientError, match="failed after 3 attempts"):
            client.score([SAMPLE])
        assert breaker.state is BreakerState.OPEN
        with pytest.raises(CircuitOpenError, match=r"circuit breaker .* is open"):
            client.score([SAMPLE])  # fails fast, nothing sent
        revived.append(replica(*ports))
        deadline = time.monotonic() + 30
        while True:  # the half-open trial goes out once reset_after_s has passed
            try:
                [result] = client.score([SAMPLE])
                break
            except (CircuitOpenError, TransientError):
                assert time.monotonic() < deadline, "client did not recover"
                time.sleep(0.2)
        assert result.score == pytest.approx(1.0, abs=0.05)
        assert breaker.state is BreakerState.CLOSED
    finally:
        client.close()
        for s in revived:
            s.stop()
