"""The vLLM test harness itself: a real vLLM OpenAI server on CPU with a tiny random Qwen2-VL.

The judges in production are 8B/32B Qwen3-VL models on GPUs; here the same server software serves a
random model (the real weights cannot run here), and requests that need a parseable answer force its
format with `structured_outputs`.
"""

from __future__ import annotations

import base64
import io
import re

import httpx
import pytest
from PIL import Image

from tests.judges.conftest import SERVED_NAMES
from tests.judges.vllm_server import VllmServer

pytestmark = pytest.mark.integration

ANSWER = "<answer>Image 1 is better</answer>"
SCORE_REGEX = r"<analysis>[a-z ]{1,20}</analysis><score>\[[01](, [01]){2}\]</score>"


def png_data_url(color: str, size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def judge_messages(text: str, n_images: int = 2) -> list[dict]:
    images = [
        {"type": "image_url", "image_url": {"url": png_data_url(color, size)}}
        for color, size in [("red", (512, 512)), ("blue", (640, 480))][:n_images]
    ]
    return [{"role": "user", "content": [*images, {"type": "text", "text": text}]}]


def chat(server: VllmServer, model: str, messages: list[dict], **extra: object) -> dict:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 64, **extra}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_chat_with_two_images_and_text(vllm_server: VllmServer):
    prompt = "Caption: a red square. Which image matches better?"
    with_images = chat(vllm_server, "UnifiedReward", judge_messages(prompt), max_tokens=8)
    text_only = chat(vllm_server, "UnifiedReward", [{"role": "user", "content": prompt}], max_tokens=8)

    assert isinstance(with_images["choices"][0]["message"]["content"], str)
    assert with_images["usage"]["completion_tokens"] <= 8
    # Both images reached the vision tower: each adds its image tokens (4..16 at this processor's pixel
    # limits) plus <|vision_start|>/<|vision_end|>.
    added = with_images["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"]
    assert 2 * (4 + 2) <= added <= 2 * (16 + 2)


def test_a_third_image_is_rejected(vllm_server: VllmServer):
    # --limit-mm-per-prompt '{"image": 2, ...}' is in force, as in the deployment.
    messages = judge_messages("three?")
    messages[0]["content"].insert(0, {"type": "image_url", "image_url": {"url": png_data_url("green", (64, 64))}})
    body = {"model": "UnifiedReward", "messages": messages, "max_tokens": 1}
    response = httpx.post(f"{vllm_server.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("model", SERVED_NAMES)
def test_structured_outputs_force_the_pairwise_answer(vllm_server: VllmServer, model: str):
    result = chat(
        vllm_server, model, judge_messages("Which is better?"), structured_outputs={"regex": re.escape(ANSWER)}
    )
    assert result["choices"][0]["message"]["content"] == ANSWER
    assert result["choices"][0]["finish_reason"] == "stop"


def test_structured_outputs_force_the_unigenbench_format(vllm_server: VllmServer):
    model = "UniGenBench-EvalModel-qwen3vl-32b-v1"
    result = chat(
        vllm_server, model, judge_messages("Score 3 testpoints.", 1), structured_outputs={"regex": SCORE_REGEX}
    )
    assert re.fullmatch(SCORE_REGEX, result["choices"][0]["message"]["content"])


def test_models_lists_every_served_name(vllm_server: VllmServer):
    models = httpx.get(f"{vllm_server.base_url}/models", timeout=10).json()
    assert sorted(m["id"] for m in models["data"]) == sorted(SERVED_NAMES)


def test_unknown_model_name_is_a_404(vllm_server: VllmServer):
    body = {"model": "NoSuchJudge", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    response = httpx.post(f"{vllm_server.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 404


def test_metrics_are_served(vllm_server: VllmServer):
    chat(vllm_server, "UnifiedReward", judge_messages("hi", 1), max_tokens=1)
    response = httpx.get(f"{vllm_server.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert re.search(r'^vllm:request_success_total\{.*model_name="UnifiedReward".*\} [1-9]', response.text, re.M)


def test_dev_sleep_endpoints_answer(vllm_server: VllmServer):
    # On CPU sleep mode frees nothing, but the endpoints the eval loop calls exist and track state.
    url = vllm_server.url
    assert httpx.post(f"{url}/sleep", params={"level": 1}, timeout=30).status_code == 200
    assert httpx.get(f"{url}/is_sleeping", timeout=10).json() == {"is_sleeping": True}
    assert httpx.post(f"{url}/wake_up", timeout=30).status_code == 200
    assert httpx.get(f"{url}/is_sleeping", timeout=10).json() == {"is_sleeping": False}
    answer = chat(
        vllm_server, "UnifiedReward", judge_messages("again"), structured_outputs={"regex": re.escape(ANSWER)}
    )
    assert answer["choices"][0]["message"]["content"] == ANSWER


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_killed_then_restarted_on_the_same_port(vllm_server: VllmServer):
    port, base_url = vllm_server.port, vllm_server.base_url
    try:
        vllm_server.kill()
        assert not vllm_server.is_running()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base_url}/models", timeout=5)
    finally:
        vllm_server.restart()
    assert (vllm_server.port, vllm_server.base_url) == (port, base_url)
    answer = chat(
        vllm_server, "UnifiedReward", judge_messages("back?"), structured_outputs={"regex": re.escape(ANSWER)}
    )
    assert answer["choices"][0]["message"]["content"] == ANSWER

    vllm_server.restart()  # graceful stop + start
    assert httpx.get(f"{vllm_server.url}/health", timeout=10).status_code == 200
