"""A reward service under overload and careless clients (issue 8, findings 2, 4 and 8), against the
real reward-ocr (RapidOCR on one thread) behind real gRPC and HTTP servers on port 0."""

from __future__ import annotations

import socket
import threading
import time

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deepgen.reward.v1 import reward_pb2
from deepgen_common.reward_api import reward_component
from reward_ocr.backend import OcrBackend
from tests.conftest import ocr_settings
from tests.helpers import ServiceThread, render_text

pytestmark = pytest.mark.integration

IMAGE = render_text(["QUEUE"])
SCORE = "/deepgen.reward.v1.RewardService/Score"


def request(n: int) -> bytes:
    return reward_pb2.ScoreRequest(
        samples=[reward_pb2.Sample(image={"data": IMAGE}, prompt='"QUEUE"')] * n
    ).SerializeToString()


def json_body(n: int) -> dict:
    import base64

    data = base64.b64encode(IMAGE).decode()
    return {"samples": [{"image": {"data": data}, "prompt": '"QUEUE"'}] * n}


@pytest.fixture(scope="module")
def service():
    settings = ocr_settings(
        ocr_executor="thread",
        ocr_workers=1,
        max_request_bytes=1 << 20,
        max_image_bytes=1 << 19,
        header_read_timeout_s=2.0,
        body_read_timeout_s=2.0,
    )
    running = ServiceThread(settings, reward_component(OcrBackend)).start()
    with httpx.Client(base_url=running.http_url, timeout=60) as http:
        assert http.post("/v1/score", json=json_body(2)).status_code == 200  # measures the service time
    yield running
    running.stop()


@pytest.fixture(scope="module")
def score(service):
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
        yield channel.unary_unary(SCORE)


def metric(service: ServiceThread, name: str, **labels: str) -> float:
    text = httpx.get(f"{service.http_url}/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def patience(service: ServiceThread) -> float:
    """How long a client that leaves waits first: three samples' worth of the measured service time, so a
    handful of a 16-sample request runs whether a sample takes 0.1 s or 1 s on this machine."""
    return 3 * service.running.metrics.sample_seconds


# Of a 16-sample request whose client leaves after `patience`: about three samples finish before it leaves,
# the one running then finishes too, the rest never start. Half the request leaves room for a slow moment.
AT_MOST_RUN = 8


def wait_idle(service: ServiceThread) -> None:
    while service.running.service.admission.pending:
        time.sleep(0.05)


def test_a_request_that_cannot_finish_before_its_deadline_is_refused_at_once(service, score):
    busy = score.future(request(16), timeout=120)  # 16 samples of OCR on the one worker
    time.sleep(0.3)
    # Room for a few samples, far from the dozen queued ahead, however fast this machine reads.
    deadline = max(1.0, 4 * service.running.metrics.sample_seconds)
    with pytest.raises(grpc.RpcError) as info:
        score(request(1), timeout=deadline)
    # Refused, not left to time out: the answer came before the deadline.
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert "after its deadline" in info.value.details()
    assert int(dict(info.value.trailing_metadata())["retry-after"]) >= 1
    response = httpx.post(
        f"{service.http_url}/v1/score",
        json=json_body(1),
        headers={"x-request-timeout-ms": str(round(deadline * 1000))},
        timeout=60,
    )
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert int(response.headers["retry-after"]) >= 1
    # A request whose deadline leaves room is admitted behind the busy one.
    assert len(reward_pb2.ScoreResponse.FromString(score(request(1), timeout=120)).results) == 1
    assert len(reward_pb2.ScoreResponse.FromString(busy.result()).results) == 16


def test_a_malformed_deadline_header_names_the_header(service):
    response = httpx.post(f"{service.http_url}/v1/score", json=json_body(1), headers={"x-request-timeout-ms": "soon"})
    assert response.status_code == 400
    assert "x-request-timeout-ms must be a positive integer of milliseconds" in response.json()["error"]["message"]


def test_queued_samples_of_a_cancelled_grpc_call_are_dropped_and_counted(service, score):
    wait_idle(service)
    inferred = metric(service, "deepgen_stage_seconds_count", stage="infer")
    cancelled = metric(service, "deepgen_requests_total", transport="grpc", method="Score", code="CANCELLED")
    call = score.future(request(16), timeout=120)
    time.sleep(patience(service))
    call.cancel()
    wait_idle(service)
    assert len(reward_pb2.ScoreResponse.FromString(score(request(1), timeout=120)).results) == 1
    assert metric(service, "deepgen_stage_seconds_count", stage="infer") - inferred <= AT_MOST_RUN
    assert (
        metric(service, "deepgen_requests_total", transport="grpc", method="Score", code="CANCELLED") == cancelled + 1
    )


def test_a_grpc_call_past_its_deadline_is_counted_as_such(service, score):
    wait_idle(service)
    before = metric(service, "deepgen_requests_total", transport="grpc", method="Score", code="DEADLINE_EXCEEDED")
    # Admitted (one sample of the usual time fits), but this page of text takes many times longer.
    dense = render_text([f"LINE {i} WORDS HERE" for i in range(20)], size=(1600, 2000), font_size=40)
    slow = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image={"data": dense}, prompt='"LINE 1"')])
    with pytest.raises(grpc.RpcError) as info:
        score(slow.SerializeToString(), timeout=max(2.0, 3 * service.running.metrics.sample_seconds))
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    counted = "deepgen_requests_total", {"transport": "grpc", "method": "Score", "code": "DEADLINE_EXCEEDED"}
    for _ in range(50):  # the server counts when it sees the cancellation, a moment after the client
        if metric(service, counted[0], **counted[1]) == before + 1:
            break
        time.sleep(0.1)
    assert metric(service, counted[0], **counted[1]) == before + 1
    score(request(1), timeout=120)  # queued behind the page the worker is still reading


def test_an_http_client_that_leaves_stops_its_work_and_is_counted(service):
    wait_idle(service)
    inferred = metric(service, "deepgen_stage_seconds_count", stage="infer")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{service.http_url}/v1/score", json=json_body(16), timeout=patience(service))
    wait_idle(service)
    assert metric(service, "deepgen_stage_seconds_count", stage="infer") - inferred <= AT_MOST_RUN
    assert metric(service, "deepgen_requests_total", transport="http", method="/v1/score", code="499") >= 1


def test_every_oversized_body_is_413_and_counted(service):
    before = metric(service, "deepgen_requests_total", transport="http", method="/v1/score", code="413")
    limit = service.settings.max_request_bytes

    def chunks():
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    chunked = httpx.post(f"{service.http_url}/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert "MAX_REQUEST_BYTES" in chunked.json()["error"]["message"]
    declared = httpx.post(f"{service.http_url}/v1/score", content=b" " * (limit + 1))
    assert declared.status_code == 413
    after = metric(service, "deepgen_requests_total", transport="http", method="/v1/score", code="413")
    assert after == before + 2


def test_a_body_sent_too_slowly_is_cut_off(service):
    with socket.create_connection(("127.0.0.1", service.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
        )
        sock.settimeout(1.0)
        answer = b""
        for _ in range(30):  # one byte a second, far slower than BODY_READ_TIMEOUT_S allows
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b" ")
                continue
            break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        # The server closes the connection after the 408: an end of stream, or a reset when a byte we sent
        # was still unread at its close.
        sock.settimeout(10)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass


def test_connections_sending_headers_slowly_are_closed(service):
    closed = []

    def drip() -> None:
        with socket.create_connection(("127.0.0.1", service.http_port), timeout=30) as sock:
            sock.settimeout(1.0)
            for line in [b"GET /healthz HTTP/1.1\r\n", *(b"x-slow-%d: y\r\n" % i for i in range(30))]:
                try:
                    sock.sendall(line)
                    if sock.recv(1) == b"":
                        closed.append(True)
                        return
                except TimeoutError:
                    continue
                except OSError:
                    closed.append(True)
                    return

    threads = [threading.Thread(target=drip) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(closed) == 20
    assert httpx.get(f"{service.http_url}/healthz").status_code == 200


class FailingOcrBackend(OcrBackend):
    """reward-ocr with a bug on one prompt: the only way to reach a 500 with a real backend. A stand-in
    for a backend defect, which the real one does not have on purpose."""

    async def score(self, samples, mode):
        if any(s.prompt == '"BUG"' for s in samples):
            raise RuntimeError("backend bug")
        return await super().score(samples, mode)


def test_internal_errors_are_counted_once_with_their_code():
    running = ServiceThread(ocr_settings(ocr_executor="thread", ocr_workers=1), reward_component(FailingOcrBackend))
    running.start()
    try:
        body = json_body(1)
        body["samples"][0]["prompt"] = '"BUG"'
        response = httpx.post(f"{running.http_url}/v1/score", json=body, timeout=60)
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "INTERNAL"
        assert "Traceback" not in response.text
        with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            bug = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image={"data": IMAGE}, prompt='"BUG"')])
            with pytest.raises(grpc.RpcError) as info:
                channel.unary_unary(SCORE)(bug.SerializeToString(), timeout=60)
        assert info.value.code() is grpc.StatusCode.INTERNAL
        assert metric(running, "deepgen_requests_total", transport="http", method="/v1/score", code="500") == 1
        assert metric(running, "deepgen_requests_total", transport="grpc", method="Score", code="INTERNAL") == 1
        assert metric(running, "deepgen_requests_total", method="/v1/score") == 1  # once, not twice
    finally:
        running.stop()
