"""reward-ocr end to end: real RapidOCR in worker processes behind real gRPC and HTTP servers."""

from __future__ import annotations

import base64
import concurrent.futures
import re

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from deepgen.reward.v1 import reward_pb2
from deepgen_common.client import RewardClient, RewardServiceError
from deepgen_common.types import ImageFormat, Mode, Outcome, Sample
from tests.helpers import gray16_png, png_bomb, render_text

pytestmark = pytest.mark.integration

SCORE = "/deepgen.reward.v1.RewardService/Score"


@pytest.fixture(scope="module", params=["grpc", "http"])
def client(request: pytest.FixtureRequest, ocr_service):
    url = ocr_service.grpc_url if request.param == "grpc" else ocr_service.http_url
    with RewardClient(url, timeout_s=60) as c:
        yield c


def test_exact_wrong_several_and_not_applicable(client: RewardClient):
    sign = render_text(["OPEN 24 HOURS"])
    two_lines = render_text(["FRESH BREAD", "DAILY"])
    results = client.score(
        [
            Sample(sign, 'A shop sign that reads "OPEN 24 HOURS"'),
            Sample(sign, 'A shop sign that reads "CLOSED FOREVER"'),
            Sample(two_lines, 'A bakery poster with "FRESH BREAD" and the word “DAILY”'),
            Sample(two_lines, 'A bakery poster with "FRESH BREAD" and "WEEKLY"'),
            Sample(sign, "A shop sign at night, no text requested"),
        ]
    )
    exact, wrong, several, half, na = results
    assert exact.outcome is Outcome.OK
    assert exact.score == pytest.approx(1.0, abs=0.05)
    assert "OPEN 24 HOURS" in exact.details["ocr_text"]
    assert wrong.outcome is Outcome.OK
    assert wrong.score < 0.5
    assert several.score == pytest.approx(1.0, abs=0.05)
    # "FRESHBREAD" (10) matched, "WEEKLY" (6) vs best candidate "DAILY": 5 edits -> (10 + 1) / 16
    assert half.score == pytest.approx(11 / 16, abs=0.07)
    assert na.outcome is Outcome.NOT_APPLICABLE
    assert na.score is None


def test_punctuation_case_and_confusables(client: RewardClient):
    image = render_text(["SALE 50% OFF!"])
    results = client.score(
        [
            Sample(image, 'A banner "sale 50% off"'),  # case differs: the folded comparison forgives it
            Sample(image, 'A banner "SALE 5O OFF"'),  # letter O where the image has digit 0
            Sample(image, 'A banner "SALE, 50 ... OFF"'),  # punctuation ignored
        ]
    )
    assert [r.score for r in results] == pytest.approx([1.0, 1.0, 1.0], abs=0.05)


def test_per_item_errors_do_not_fail_the_batch(client: RewardClient):
    good = render_text(["HELLO"])
    truncated = good[: len(good) // 3]
    results = client.score(
        [
            Sample(b"GIF89a not really", '"HELLO"'),
            Sample(truncated, '"HELLO"', image_format=ImageFormat.PNG),
            Sample(png_bomb(20000, 20000), '"HELLO"', image_format=ImageFormat.PNG),
            Sample(good, '"HELLO"', image_format=ImageFormat.JPEG),
            Sample(good, '"HELLO"'),
        ]
    )
    outcomes = [r.outcome for r in results]
    assert outcomes == [Outcome.ERROR] * 4 + [Outcome.OK]
    assert "not a decodable" in results[0].error
    assert "truncated" in results[1].error or "not a decodable" in results[1].error
    assert "MAX_IMAGE_PIXELS" in results[2].error
    assert "400000000 pixels" in results[2].error
    assert "not a decodable JPEG image" in results[3].error


def test_hostile_prompts_do_not_hold_up_other_requests(ocr_service):
    # Finding 1 of issue 8: two prompts of 50,000 unclosed “ kept both workers busy for 22 s (quadratic
    # parsing) and a good request sent meanwhile waited 23 s. Now they are over MAX_PROMPT_CHARS
    # (an ERROR result each, no worker time) and, below it, parsed in linear time.
    image = render_text(["HELLO"])
    hostile = [Sample(image, "“" * 50_000), Sample(image, "“" * 19_990 + '"HELLO"')]
    with (
        RewardClient(ocr_service.grpc_url, timeout_s=15) as attacker,
        RewardClient(ocr_service.http_url, timeout_s=15) as user,
        concurrent.futures.ThreadPoolExecutor() as pool,
    ):
        attack = [pool.submit(attacker.score, hostile) for _ in range(2)]
        [good] = user.score([Sample(image, 'a sign that says "HELLO"')])
        answers = [a.result() for a in attack]
    assert good.score == pytest.approx(1.0, abs=0.05)
    for over, under in answers:
        assert over.outcome is Outcome.ERROR
        assert over.error == "prompt is 50000 characters, over the limit of 20000 (MAX_PROMPT_CHARS)"
        assert under.score == pytest.approx(1.0, abs=0.05)


def test_16_bit_grayscale_png_is_read_not_blank(client: RewardClient):
    # Finding 9 of issue 8: a 16-bit grayscale PNG was clipped to a white image and scored 0.0.
    [result] = client.score([Sample(gray16_png(render_text(["DEPTH 16"])), 'a sign "DEPTH 16"')])
    assert result.score == pytest.approx(1.0, abs=0.05)


def test_group_mode_is_rejected_as_unsupported(client: RewardClient):
    with pytest.raises(RewardServiceError, match="mode 'group' is not supported by reward-ocr; supported: pointwise"):
        client.score([Sample(render_text(["A"]), '"A"', group_id="g")], Mode.GROUP)


def test_client_splits_large_batches(ocr_service):
    image = render_text(["SPLIT"])
    with RewardClient(ocr_service.grpc_url) as c:
        results = c.score([Sample(image, '"SPLIT"')] * (c.info().limits.max_batch_size + 3))
    assert len(results) == 67
    assert all(r.score == pytest.approx(1.0, abs=0.05) for r in results)


# --- bad input on the wire: a clear error, and the service keeps serving -------------------------------


@pytest.fixture(scope="module")
def channel(ocr_service):
    with grpc.insecure_channel(
        f"127.0.0.1:{ocr_service.grpc_port}", options=[("grpc.max_send_message_length", 512 << 20)]
    ) as ch:
        yield ch


def raw_grpc(channel: grpc.Channel, body: bytes) -> bytes:
    return channel.unary_unary(SCORE)(body, timeout=60)


def assert_still_serving(ocr_service) -> None:
    with RewardClient(ocr_service.grpc_url) as c:
        [r] = c.score([Sample(render_text(["ALIVE"]), '"ALIVE"')])
    assert r.score == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (reward_pb2.ScoreRequest(), "samples is empty"),
        (reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(prompt='"A"')]), r"samples\[0\].image.data is empty"),
        (
            reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(prompt="p", image={"data": b"x"})] * 65),
            r"65 entries, over the limit of 64 \(MAX_BATCH_SIZE\)",
        ),
    ],
)
def test_grpc_bad_requests(channel, ocr_service, request_: reward_pb2.ScoreRequest, message: str):
    with pytest.raises(grpc.RpcError) as info:
        raw_grpc(channel, request_.SerializeToString())
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, info.value.details()), info.value.details()
    assert_still_serving(ocr_service)


def test_grpc_non_protobuf_body(channel, ocr_service):
    with pytest.raises(grpc.RpcError) as info:
        raw_grpc(channel, b"\xff\xff\xff garbage that is not a protobuf")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid deepgen.reward.v1.ScoreRequest protobuf" in info.value.details()
    assert_still_serving(ocr_service)


def test_grpc_message_over_size_limit(channel, ocr_service):
    limit = ocr_service.settings.max_request_bytes
    huge = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image={"data": b"\0" * (limit + 1)})])
    with pytest.raises(grpc.RpcError) as info:
        raw_grpc(channel, huge.SerializeToString())
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in info.value.details()
    assert_still_serving(ocr_service)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 422, "body is not valid JSON"),
        (b'{"samples": []}', 400, "samples is empty"),
        (b'{"samples": [{"prompt": "x"}]}', 422, "samples.0.image: Field required"),
        (b'{"samples": [{"image": {"data": "@@@"}}]}', 400, r"samples\[0\].image.data is not valid base64"),
        (b'{"samples": [{"image": {"data": "eA=="}}], "mode": "listwise"}', 422, "mode: Input should be"),
        (b'{"samples": [{"image": {"data": "eA=="}, "colour": 1}]}', 422, "samples.0.colour: Extra inputs"),
    ],
)
def test_http_bad_requests(ocr_service, body: bytes, status: int, message: str):
    response = httpx.post(
        f"{ocr_service.http_url}/v1/score", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert re.search(message, error["message"]), error["message"]
    assert_still_serving(ocr_service)


def test_http_body_over_size_limit(ocr_service):
    limit = ocr_service.settings.max_request_bytes
    response = httpx.post(
        f"{ocr_service.http_url}/v1/score",
        content=b"{" + b" " * limit + b"}",
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    assert "over the limit of" in response.json()["error"]["message"]
    assert_still_serving(ocr_service)


def test_http_openapi_and_info(ocr_service):
    spec = httpx.get(f"{ocr_service.http_url}/openapi.json").json()
    assert "/v1/score" in spec["paths"]
    info = httpx.get(f"{ocr_service.http_url}/v1/info").json()
    assert info["api"] == "deepgen.reward.v1"
    assert info["capabilities"] == ["pointwise"]


def test_http_example_from_the_contract(ocr_service):
    """The JSON shape of DESIGN.md §2, written by hand."""
    body = {
        "samples": [
            {
                "image": {"data": base64.b64encode(render_text(["HI THERE"])).decode(), "format": "png"},
                "prompt": 'a card saying "HI THERE"',
                "group_id": "g0",
                "metadata": {},
            }
        ],
        "mode": "pointwise",
    }
    response = httpx.post(f"{ocr_service.http_url}/v1/score", json=body, timeout=60)
    assert response.status_code == 200
    [result] = response.json()["results"]
    assert result["outcome"] == "OK"
    assert result["score"] == pytest.approx(1.0, abs=0.05)
    assert "error" not in result


# --- health and metrics -------------------------------------------------------------------------------


def test_health_is_serving_and_metrics_move(ocr_service):
    with grpc.insecure_channel(f"127.0.0.1:{ocr_service.grpc_port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert httpx.get(f"{ocr_service.http_url}/readyz").status_code == 200
    assert httpx.get(f"{ocr_service.http_url}/healthz").status_code == 200

    def scrape() -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{ocr_service.http_url}/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    before = scrape()
    with RewardClient(ocr_service.grpc_url) as c:
        c.score([Sample(render_text(["M"]), '"M"'), Sample(b"junk", '"M"'), Sample(b"junk", "none")])
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("deepgen_requests_total", transport="grpc", method="Score", code="OK") == 1
    assert delta("deepgen_items_total", outcome="OK") == 1
    assert delta("deepgen_items_total", outcome="ERROR") == 1
    assert delta("deepgen_items_total", outcome="NOT_APPLICABLE") == 1
    assert delta("deepgen_stage_seconds_count", stage="infer") == 1
    assert delta("deepgen_batch_size_count") == 1
    assert after[("deepgen_queue_depth", ())] == 0


def test_request_ids_are_echoed(ocr_service, channel):
    response = httpx.get(f"{ocr_service.http_url}/v1/info", headers={"x-request-id": "trace-123"})
    assert response.headers["x-request-id"] == "trace-123"
    assert len(httpx.get(f"{ocr_service.http_url}/v1/info").headers["x-request-id"]) == 32  # generated
    request = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(image={"data": b"x"}, prompt="none")])
    _, call = channel.unary_unary(SCORE).with_call(
        request.SerializeToString(), metadata=(("x-request-id", "trace-456"),), timeout=30
    )
    assert ("x-request-id", "trace-456") in call.initial_metadata()


def test_grpc_reflection_lists_the_services(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [reply] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for s in reply.list_services_response.service}
    assert {"deepgen.reward.v1.RewardService", "grpc.health.v1.Health"} <= names


def test_unknown_paths_do_not_grow_the_metrics(ocr_service):
    for i in range(3):
        assert httpx.get(f"{ocr_service.http_url}/v1/nope-{i}").status_code == 404
    assert "nope" not in httpx.get(f"{ocr_service.http_url}/metrics").text
