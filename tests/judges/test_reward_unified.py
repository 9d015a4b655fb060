"""reward-unified against a real vLLM server (tiny random Qwen2-VL on CPU).

A random model has no preferences, so each test forces the judge's answer with vLLM's
`structured_outputs` (passed through JUDGE_EXTRA_BODY, a test-only setting) and checks what the
adapter makes of it.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from deepgen_common.client import BreakerState, RewardClient, RewardServiceError
from deepgen_common.reward_api import reward_component
from deepgen_common.types import Mode, Outcome, Sample
from reward_unified.backend import UnifiedBackend
from reward_unified.settings import UnifiedSettings
from tests.helpers import SHARED_DATA, ServiceThread
from tests.judges.vllm_server import VllmServer

pytestmark = pytest.mark.integration

FIRST_WINS = {"structured_outputs": {"regex": re.escape("<answer>Image 1 is better</answer>")}}


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), colour).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = [png((200, 30, 30)), png((30, 200, 30)), png((30, 30, 200)), png((200, 200, 30))]


def adapter(vllm: VllmServer, extra_body: dict, **overrides: object) -> ServiceThread:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "http_port": 0,
        "grpc_port": 0,
        "log_format": "text",
        "judge_url": vllm.base_url,
        "templates_dir": SHARED_DATA / "templates",
        "judge_extra_body": json.dumps(extra_body),
        "judge_max_tokens": 64,
        "judge_health_poll_s": 0.5,
    }
    values.update(overrides)
    return ServiceThread(UnifiedSettings(**values), reward_component(UnifiedBackend)).start()


def judge_calls(service: ServiceThread) -> dict[str, float]:
    text = httpx.get(f"{service.http_url}/metrics").text
    return {
        s.labels["result"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "deepgen_judge_calls_total"
    }


def group(gid: str, prompt: str = "a colourful square") -> list[Sample]:
    return [Sample(image, prompt, group_id=gid) for image in IMAGES]


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_forced_preference_gives_the_implied_win_rates(vllm_server: VllmServer, transport: str):
    service = adapter(vllm_server, FIRST_WINS)
    url = service.grpc_url if transport == "grpc" else service.http_url
    try:
        with RewardClient(url) as client:
            results = client.score(group("g0") + group("g1"), Mode.GROUP)
        # Image 1 always wins: in a group of 4 the k-th image (0-based) wins 3-k of its 3 comparisons.
        expected = [1.0, 2 / 3, 1 / 3, 0.0] * 2
        assert [r.score for r in results] == pytest.approx(expected)
        assert sum(r.score for r in results[:4]) == pytest.approx(2.0)
        assert results[0].details["comparisons"] == "3"
        assert judge_calls(service)["ok"] == 2 * 6
    finally:
        service.stop()


def test_both_orders_doubles_the_calls_and_cancels_position_bias(vllm_server: VllmServer):
    service = adapter(vllm_server, FIRST_WINS, both_orders=True)
    try:
        with RewardClient(service.grpc_url) as client:
            results = client.score(group("g0"), Mode.GROUP)
        assert [r.score for r in results] == pytest.approx([0.5] * 4)
        assert judge_calls(service)["ok"] == 2 * 6
    finally:
        service.stop()


def test_unparseable_verdicts_are_ties_and_counted(vllm_server: VllmServer):
    service = adapter(vllm_server, {"structured_outputs": {"regex": re.escape("<answer>They are equal</answer>")}})
    try:
        with RewardClient(service.http_url) as client:
            results = client.score(group("g0")[:3], Mode.GROUP)
        assert [r.score for r in results] == pytest.approx([0.5] * 3)
        assert [r.details["ties"] for r in results] == ["2"] * 3
        assert judge_calls(service)["tie"] == 3
    finally:
        service.stop()


def test_pointwise_scores_are_the_mean_of_the_three_dimensions(vllm_server: VllmServer):
    regex = re.escape("Alignment Score (1-5): 4\nCoherence Score (1-5): 3\nStyle Score (1-5): 5")
    service = adapter(vllm_server, {"structured_outputs": {"regex": regex}})
    try:
        with RewardClient(service.grpc_url) as client:
            [result] = client.score([Sample(IMAGES[0], "a red square")], Mode.POINTWISE)
        assert result.score == pytest.approx(4.0)
        assert dict(result.details) == {"alignment": "4", "coherence": "3", "style": "5"}
    finally:
        service.stop()


def test_bad_samples_and_small_groups(vllm_server: VllmServer):
    service = adapter(vllm_server, FIRST_WINS)
    try:
        with RewardClient(service.grpc_url) as client:
            samples = [
                Sample(b"not an image", "p", group_id="g0"),
                *group("g0")[:2],
                Sample(IMAGES[3], "p", group_id="solo"),
            ]
            bad, first, second, solo = client.score(samples, Mode.GROUP)
            assert bad.outcome is Outcome.ERROR
            assert "not a decodable" in bad.error
            assert (first.score, second.score) == (1.0, 0.0)  # the two valid images compared with each other
            assert solo.outcome is Outcome.NOT_APPLICABLE
            with pytest.raises(RewardServiceError, match="needs a group_id on every sample"):
                client.score([Sample(IMAGES[0], "p")], Mode.GROUP)
        response = httpx.post(f"{service.http_url}/v1/score", json={"samples": "nope", "mode": "group"})
        assert response.status_code == 422
    finally:
        service.stop()


def test_a_group_over_max_group_size_is_refused_before_any_judge_call(vllm_server: VllmServer):
    # Finding 7 of issue 8: one request with a group of 64 made 2,016 judge calls.
    service = adapter(vllm_server, FIRST_WINS)
    try:
        big = [Sample(IMAGES[i % 4], "p", group_id="big") for i in range(17)]
        with RewardClient(service.grpc_url) as client:
            with pytest.raises(
                RewardServiceError, match=r"group 'big' has 17 samples, over the limit of 16 \(MAX_GROUP_SIZE\)"
            ):
                client.score(group("g0") + big, Mode.GROUP)
            assert client.breaker.state is BreakerState.CLOSED  # bad input is not an outage
        body = {
            "samples": [{"image": {"data": base64.b64encode(s.image).decode()}, "group_id": "big"} for s in big],
            "mode": "group",
        }
        response = httpx.post(f"{service.http_url}/v1/score", json=body, timeout=30)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "INVALID_ARGUMENT"
        assert judge_calls(service) == {}
    finally:
        service.stop()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_judge_outage_gives_errors_opens_the_breaker_and_recovers(vllm_server: VllmServer):
    # A slow health poll, so the request below reaches a backend that still believes the judge is up.
    service = adapter(vllm_server, FIRST_WINS, judge_health_poll_s=3.0, judge_max_attempts=2)
    backend = service.running.service.backend
    try:
        vllm_server.stop()
        with RewardClient(service.grpc_url) as client:
            results = client.score(group("g0"), Mode.GROUP)
        assert [r.outcome for r in results] == [Outcome.ERROR] * 4  # never a silent tie
        assert all("judge call failed" in r.error for r in results)
        assert backend.judge.breaker.state is BreakerState.OPEN
        deadline = time.monotonic() + 30
        while httpx.get(f"{service.http_url}/readyz").status_code != 503:
            assert time.monotonic() < deadline, "readiness never followed the judge down"
            time.sleep(0.2)
    finally:
        vllm_server.restart()
    deadline = time.monotonic() + 60
    while httpx.get(f"{service.http_url}/readyz").status_code != 200:
        assert time.monotonic() < deadline, "readiness never came back"
        time.sleep(0.2)
    # No wait for the breaker's reset period (10 s): the passing health check closed it.
    try:
        with RewardClient(service.grpc_url) as client:
            results = client.score(group("g0"), Mode.GROUP)
        assert [r.score for r in results] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
        assert backend.judge.breaker.state is BreakerState.CLOSED
    finally:
        service.stop()
