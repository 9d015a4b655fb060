"""Client pieces that need no server: URL routing, request splitting, retry policy."""

from __future__ import annotations

import socket

import pytest

from deepgen_common.client import (
    BreakerState,
    CircuitBreaker,
    OverloadedError,
    RetryPolicy,
    RewardClient,
    is_ready,
    make_transport,
    wait_ready,
)
from deepgen_common.client.failover import FailoverTransport
from deepgen_common.client.reward_client import _chunk
from deepgen_common.client.transports import GrpcTransport, HttpTransport
from deepgen_common.convert import request_to_pb
from deepgen_common.settings import ServiceSettings
from deepgen_common.types import Limits, Mode, Outcome, Result, Sample, ServiceInfo


def test_url_schemes_pick_the_transport():
    assert isinstance(make_transport("http://reward-ocr:18082"), HttpTransport)
    assert isinstance(make_transport("grpc://reward-ocr:50051"), GrpcTransport)
    assert isinstance(make_transport("grpcs://reward-ocr:50051"), GrpcTransport)
    assert isinstance(make_transport("ipv4:127.0.0.1:1,127.0.0.1:2"), GrpcTransport)
    assert isinstance(make_transport("grpc://h1:1,h2:2"), FailoverTransport)
    with pytest.raises(ValueError, match=r"use http://host:port or https://host:port \(HTTP/JSON\)"):
        make_transport("ftp://x")


def samples(sizes: list[int], groups: list[str] | None = None) -> list[Sample]:
    groups = groups or [""] * len(sizes)
    return [Sample(image=b"x" * n, group_id=g) for n, g in zip(sizes, groups, strict=True)]


def test_chunks_respect_batch_size():
    s = samples([10] * 7)
    assert _chunk(list(range(7)), s, Mode.POINTWISE, max_batch=3, max_bytes=1 << 30) == [[0, 1, 2], [3, 4, 5], [6]]


def test_chunks_respect_request_bytes():
    # each sample costs 4/3 of its bytes + 4096 overhead; budget is 80% of max_bytes
    s = samples([30_000] * 4)
    cost = 30_000 * 4 // 3 + 4096
    chunks = _chunk(list(range(4)), s, Mode.POINTWISE, max_batch=64, max_bytes=int(2.5 * cost / 0.8))
    assert chunks == [[0, 1], [2, 3]]


def test_every_chunk_fits_the_services_grpc_message_limit():
    settings = ServiceSettings(http_port=0, grpc_port=0, max_request_bytes=1 << 20, max_image_bytes=1 << 17)
    s = samples([350_000] * 4 + [25_000, 90_000, 7_000] * 10)
    chunks = _chunk(list(range(len(s))), s, Mode.POINTWISE, max_batch=64, max_bytes=settings.max_request_bytes)
    assert len(chunks) > 1
    for chunk in chunks:
        assert request_to_pb([s[i] for i in chunk], Mode.POINTWISE).ByteSize() <= settings.max_grpc_message_bytes


def test_group_mode_never_splits_a_group():
    s = samples([10] * 6, groups=["a", "b", "a", "b", "c", "c"])
    assert _chunk(list(range(6)), s, Mode.GROUP, max_batch=4, max_bytes=1 << 30) == [[0, 2, 1, 3], [4, 5]]
    with pytest.raises(ValueError, match="group 'a' has 2 samples, over the service's max batch of 1"):
        _chunk(list(range(6)), s, Mode.GROUP, max_batch=1, max_bytes=1 << 30)


def test_mismatched_images_and_prompts_fail_before_sending():
    client = RewardClient("grpc://127.0.0.1:1")
    with pytest.raises(ValueError, match="got 2 images but 1 prompts; pass one prompt per image"):
        client.score_images([b"a", b"b"], ["p"])
    client.close()


def test_retry_delays_are_bounded_and_grow():
    policy = RetryPolicy(max_attempts=5, initial_s=0.1, max_s=0.3)
    assert all(0 <= policy.delay(k) <= min(0.3, 0.1 * 2**k) for k in range(10) for _ in range(20))
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_wait_ready_gives_up(scheme: str):
    url = f"{scheme}://127.0.0.1:{closed_port()}"
    assert not is_ready(url, timeout_s=0.5)
    with pytest.raises(RuntimeError, match="stopped before it became ready"):
        wait_ready(url, alive=lambda: False)
    with pytest.raises(TimeoutError, match="not ready after"):
        wait_ready(url, timeout_s=0.3, poll_s=0.05)


class RefusingTransport:
    """A stand-in transport that answers 429 (with Retry-After) `refusals` times, then scores: the
    real admission refusals are exercised in tests/common/test_overload.py."""

    def __init__(self, refusals: int, retry_after_s: float | None) -> None:
        self.refusals, self.retry_after_s, self.calls = refusals, retry_after_s, 0

    def score(self, samples, mode, timeout_s):
        self.calls += 1
        if self.calls <= self.refusals:
            raise OverloadedError("RESOURCE_EXHAUSTED: busy", self.retry_after_s)
        return [Result(outcome=Outcome.OK, score=1.0) for _ in samples]

    def info(self, timeout_s):
        return ServiceInfo("stub", "0", "v1", "stub", Limits(64, 1 << 20, 1 << 20, 1 << 24, 512), (Mode.POINTWISE,))

    def close(self):
        pass


def test_overloaded_is_retried_until_the_timeout_without_tripping_the_breaker():
    transport = RefusingTransport(refusals=6, retry_after_s=0.01)
    breaker = CircuitBreaker("stub", failure_threshold=2)
    client = RewardClient("grpc://stub:1", transport=transport, breaker=breaker, retry=RetryPolicy(max_attempts=1))
    assert client.score([Sample(b"x")])[0].score == 1.0  # 6 refusals > max_attempts: overload is not an outage
    assert transport.calls == 7
    assert breaker.state is BreakerState.CLOSED


def test_overloaded_gives_up_when_the_retry_after_passes_the_timeout():
    client = RewardClient("grpc://stub:1", transport=RefusingTransport(refusals=99, retry_after_s=5.0), timeout_s=1.0)
    with pytest.raises(OverloadedError, match=r"still refused after 0s \(timeout_s=1\)"):
        client.score([Sample(b"x")])
