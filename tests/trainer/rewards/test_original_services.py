"""URLs as the original DeepGen-RL wrote them: `host:port` means HTTP, unset reward URLs default to the
original's local addresses, and an address still pointing at one of the original's services stops the run
within seconds with the fix. The stand-ins below are the two services the original's users run and this
trainer cannot run here (a real original OCR service needs PaddleOCR; a judge needs a VLM on vLLM): a Flask
-like OCR endpoint that answers `POST /` with a pickle, and a bare OpenAI-compatible server."""

from __future__ import annotations

import json
import pickle
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deepgen_trainer.config import parse_args
from deepgen_trainer.rewards.original_services import recognise_original_service
from deepgen_trainer.rewards.outage import RewardOutage, wait_for_reward_services
from deepgen_trainer.train import main
from tests.trainer.rewards.test_outage import free_port, write_inputs
from tests.trainer.test_learning import LEARN


class OriginalOcr(BaseHTTPRequestHandler):
    """The original OCR service's HTTP surface: `POST /` only, every answer a pickle (an error for a bad body)."""

    def do_POST(self) -> None:
        body = pickle.dumps({"error": "Traceback: UnpicklingError"})
        self.send_response(500 if self.path == "/" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # Flask: no GET route
        self.send_response(404 if self.path != "/" else 405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class BareOpenAI(BaseHTTPRequestHandler):
    """vLLM's OpenAI server as far as the probe sees it: a model list at /v1/models, no /readyz."""

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "UnifiedReward-Think-qwen3vl-8b", "object": "model"}]})
        self.send_response(200 if self.path == "/v1/models" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode() if self.path == "/v1/models" else b"")

    def do_POST(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"  # as the original's users write it: no scheme
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def nothing_unpickled(monkeypatch):
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something from the network was unpickled")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("localhost:18082", "http://localhost:18082"),
        ("10.0.0.1:18082,10.0.0.2:18082", "http://10.0.0.1:18082,10.0.0.2:18082"),
        ("http://ocr:18082", "http://ocr:18082"),
        ("grpc://reward-ocr:50051", "grpc://reward-ocr:50051"),
        ("dns:///reward-ocr:50051", "dns:///reward-ocr:50051"),
    ],
)
def test_each_url_form_from_the_flag_and_the_environment(given, url) -> None:
    assert parse_args(["--ocr_url", given], environ={}).ocr_url == url
    assert parse_args([], environ={"OCR_URL": given}).ocr_url == url


def test_unset_urls_default_to_the_originals_local_addresses_and_empty_ones_stay_off() -> None:
    unset = parse_args([], environ={})
    assert (unset.ocr_url, unset.unifiedreward_think_url) == ("http://localhost:18082", "http://localhost:18087")
    assert unset.unigenbench_api_url is None  # the original's :8000 is its launcher's (scripts/train.sh)
    empty = parse_args([], environ={"OCR_URL": "", "UNIFIEDREWARD_THINK_URL": "", "UNIGENBENCH_API_URL": ""})
    assert (empty.ocr_url, empty.unifiedreward_think_url, empty.unigenbench_api_url) == (None, None, None)


def test_a_default_address_that_answers_nothing_gets_the_readiness_wait_naming_the_variable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RewardOutage, match=f"the service at UNIFIEDREWARD_THINK_URL={url} was not ready within 0.5 s"):
        wait_for_reward_services({"unifiedreward_think": url}, timeout_s=0.5)


def test_the_original_ocr_service_stops_the_run_within_seconds_naming_reward_ocr(
    tmp_path: Path, caplog, nothing_unpickled
) -> None:
    with serve(OriginalOcr) as address:
        argv = [*LEARN, "--dataset_config", str(write_inputs(tmp_path)), "--output_dir", str(tmp_path / "run"),
                "--ocr_url", address, "--reward_ready_timeout", "600"]  # fmt: skip
        start = time.monotonic()
        assert main(argv) == 3
        elapsed = time.monotonic() - start
    assert elapsed < 60, elapsed  # not the 600 s readiness timeout
    assert f"OCR_URL=http://{address} answers POST / with a pickle" in caplog.text
    assert "nothing was unpickled" in caplog.text
    assert "python -m reward_ocr" in caplog.text
    assert "set OCR_URL=grpc://localhost:50051" in caplog.text


def test_a_vllm_server_as_unifiedreward_think_url_gets_the_command_that_keeps_it_as_the_judge() -> None:
    with serve(BareOpenAI) as address:
        start = time.monotonic()
        with pytest.raises(RewardOutage) as error:
            wait_for_reward_services({"unifiedreward_think": f"http://{address}"}, timeout_s=600)
        assert time.monotonic() - start < 60
    message = str(error.value)
    assert f"JUDGE_URL=http://{address}/v1 JUDGE_MODEL=UnifiedReward-Think-qwen3vl-8b" in message
    assert "python -m reward_unified" in message
    assert "UNIFIEDREWARD_THINK_URL=grpc://localhost:50052" in message


def test_a_vllm_server_as_unigenbench_api_url_stops_the_start_with_the_eval_unigenbench_command(
    tmp_path: Path, caplog
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a picture of one thing\n")
    train = tmp_path / "train.yaml"
    train.write_text(f"datasets:\n  - path: {prompts}\n    rewards: {{clip_sim: 1.0}}\n")
    with serve(BareOpenAI) as address:
        argv = [*LEARN, "--dataset_config", str(train), "--output_dir", str(tmp_path / "run"),
                "--unigenbench_api_url", address, "--eval_freq", "10"]  # fmt: skip
        start = time.monotonic()
        assert main(argv) == 2
        assert time.monotonic() - start < 60
    assert f"JUDGE_URL=http://{address}/v1 JUDGE_MODEL=UnifiedReward-Think-qwen3vl-8b" in caplog.text
    assert "python -m eval_unigenbench" in caplog.text
    assert "UNIGENBENCH_API_URL=grpc://localhost:50053" in caplog.text


def test_a_service_of_this_stack_or_nothing_is_not_mistaken_for_the_originals() -> None:
    assert recognise_original_service("OCR_URL", f"http://127.0.0.1:{free_port()}") is None
    assert recognise_original_service("OCR_URL", "grpc://127.0.0.1:1") is None
