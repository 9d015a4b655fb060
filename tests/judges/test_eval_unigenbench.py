"""eval-unigenbench against a real vLLM server (tiny random Qwen2-VL on CPU) and real benchmark data.

The judge's answers are forced per prompt by `ForcingProxy` (vLLM structured outputs), so each test
knows the score list every image gets and checks the accuracies the service computes from them.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from PIL import Image

from deepgen.eval.v1 import eval_pb2
from deepgen_common.client import EvalClient, EvalImage, EvalRun, RetryPolicy, RewardServiceError, TransientError
from deepgen_common.types import RunSummary
from eval_unigenbench.benchmark import BenchmarkItem
from tests.helpers import ServiceThread
from tests.judges.forcing_proxy import ForcingProxy
from tests.judges.unigenbench_forcing import EN, ZH, expected_accuracies, forced_scores, forcer, start_eval
from tests.judges.vllm_server import VllmServer

pytestmark = pytest.mark.integration


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), (seed * 37 % 256, seed * 91 % 256, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def check_summary(summary: RunSummary, items: list[BenchmarkItem]) -> None:
    sub, primary, overall = expected_accuracies(items)
    assert {d.name: d.accuracy for d in summary.sub_dimensions} == pytest.approx(sub)
    assert {d.name: d.accuracy for d in summary.primary_dimensions} == pytest.approx(primary)
    assert summary.overall_accuracy == pytest.approx(overall)
    assert summary.primary_mean_accuracy == pytest.approx(sum(primary.values()) / len(primary))


@pytest.fixture
def proxy(vllm_server: VllmServer) -> Iterator[ForcingProxy]:
    p = ForcingProxy(vllm_server.base_url.removesuffix("/v1"), forcer(EN + ZH)).start()
    yield p
    p.stop()


def generate(client: EvalClient) -> list[EvalImage]:
    """What the trainer does: an image for every prompt and duplicate the service lists."""
    listed = client.prompts()
    return [
        EvalImage(prompt_id, dup, png(n * listed.duplicates + dup))
        for n, (prompt_id, _) in enumerate(listed.prompts)
        for dup in range(listed.duplicates)
    ]


def test_grpc_run_over_20_english_prompts_gives_the_forced_accuracies(proxy: ForcingProxy, tmp_path: Path):
    service = start_eval(proxy.base_url, tmp_path)
    try:
        with EvalClient(service.grpc_url, batch_size=6) as client:
            listed = client.prompts()
            assert (listed.benchmark, listed.duplicates) == ("unigenbench-en", 1)
            assert [p for p, _ in listed.prompts] == [i.prompt_id for i in EN]
            run_id = client.start_run(step=10)
            assert client.submit(run_id, generate(client)) == 20  # one client stream of 4 batches
            summary = client.finish(run_id)
    finally:
        service.stop()
    assert (summary.step, summary.images_judged, summary.parse_failures, summary.errors) == (10, 20, 0, 0)
    check_summary(summary, EN)
    assert len(proxy.chat_texts) == 20  # every answer parsed at the first attempt: no retries

    folder = tmp_path / f"step-0000010-{run_id}"
    written = json.loads((folder / "summary.json").read_text())
    assert written["overall_accuracy"] == pytest.approx(summary.overall_accuracy)
    rows = (folder / "results.csv").read_text().splitlines()
    assert len(rows) == 21
    assert rows[0].startswith("prompt_id,duplicate,prompt")


def test_http_run_over_5_chinese_prompts_with_duplicates(proxy: ForcingProxy, tmp_path: Path):
    service = start_eval(proxy.base_url, tmp_path, benchmark="test_prompts_zh", prompt_limit=5, duplicates=2)
    try:
        with EvalClient(service.http_url, batch_size=4) as client:
            run_id = client.start_run(step=3)
            assert client.submit(run_id, generate(client)) == 10
            summary = client.finish(run_id)
    finally:
        service.stop()
    assert (summary.images_judged, summary.parse_failures, summary.errors) == (10, 0, 0)
    check_summary(summary, ZH)  # each prompt counted twice: the accuracies are unchanged
    assert sum(d.total for d in summary.sub_dimensions) == 2 * sum(len(i.testpoints) for i in ZH)


def test_garbage_answers_are_retried_then_counted_as_parse_failures(vllm_server: VllmServer, tmp_path: Path):
    garbage = frozenset({EN[1].prompt_id, EN[3].prompt_id})
    proxy = ForcingProxy(vllm_server.base_url.removesuffix("/v1"), forcer(EN, garbage)).start()
    service = start_eval(proxy.base_url, tmp_path, prompt_limit=5, parse_retries=2)
    try:
        with EvalClient(service.http_url) as client:
            run_id = client.start_run(step=0)
            client.submit(run_id, generate(client))
            summary = client.finish(run_id)
        metrics = httpx.get(f"{service.http_url}/metrics").text
    finally:
        service.stop()
        proxy.stop()
    assert (summary.images_judged, summary.parse_failures, summary.errors) == (3, 2, 0)
    check_summary(summary, [i for i in EN[:5] if i.prompt_id not in garbage])  # excluded, not zeros
    asked = [max((i for i in EN if i.prompt in t), key=lambda i: len(i.prompt)).prompt_id for t in proxy.chat_texts]
    assert {pid: asked.count(pid) for pid in garbage} == dict.fromkeys(garbage, 3)  # 1 + PARSE_RETRIES
    assert 'deepgen_judge_calls_total{result="unparseable"} 6.0' in metrics
    rows = (tmp_path / f"step-0000000-{run_id}" / "results.csv").read_text()
    assert rows.count("parse_failure") == 2
    assert "missing_tag" in rows


def test_judge_down_mid_run_gives_errors_opens_the_breaker_and_recovers(proxy: ForcingProxy, tmp_path: Path):
    """The judge disappears (the proxy in front of vLLM stops: connection refused, as with a stopped
    vLLM), then comes back on the same address; the adapter is never restarted."""
    # Health polls every 2 s: the images submitted right after the judge goes away are accepted and then
    # fail at the judge (error rows); the next poll turns readiness false.
    service = start_eval(proxy.base_url, tmp_path, prompt_limit=6, judge_health_poll_s=2.0)
    backend = service.running.service
    try:
        with EvalClient(service.http_url) as client:
            images = generate(client)
            run_id = client.start_run(step=1)
            client.submit(run_id, images[:3])
            proxy.stop()
            client.submit(run_id, images[3:])
            summary = client.finish(run_id)
            assert summary.errors >= 3
            assert summary.images_judged + summary.errors == 6
            assert backend.judge.breaker.state == "open"
            wait_for(lambda: not service.running.service.ready(), "readiness to turn false")
            assert httpx.get(f"{service.http_url}/readyz").status_code == 503
            with pytest.raises(TransientError, match="is not answering /health"):
                client.start_run(step=2)  # retried (503 is transient), then given up

            proxy.start()  # same port
            wait_for(lambda: service.running.service.ready(), "readiness to come back")
            run_id = client.start_run(step=2)
            client.submit(run_id, images)
            summary = client.finish(run_id)
    finally:
        service.stop()
    assert (summary.images_judged, summary.errors) == (6, 0)
    check_summary(summary, EN[:6])


def test_bad_input_gets_clear_errors_and_the_service_stays_up(proxy: ForcingProxy, tmp_path: Path):
    service = start_eval(proxy.base_url, tmp_path, prompt_limit=3, max_batch_size=4)
    try:
        with EvalClient(service.grpc_url) as client:
            images = generate(client)
            run_id = client.start_run(step=0)
            cases = [
                (EvalRun("nope", run_id.secret), images[:1], "NOT_FOUND", "is not open"),
                (run_id, [EvalImage("no-such-id", 0, png(1))], "INVALID_ARGUMENT", "is not a prompt of"),
                (
                    run_id,
                    [EvalImage(images[0].prompt_id, 1, png(1))],
                    "INVALID_ARGUMENT",
                    r"duplicate is 1; valid: 0\.\.0",
                ),
                (run_id, [images[0], images[0]], "INVALID_ARGUMENT", "already submitted"),
                (run_id, [EvalImage(images[0].prompt_id, 0, b"")], "INVALID_ARGUMENT", "image.data is empty"),
            ]
            for rid, batch, code, message in cases:
                with pytest.raises(RewardServiceError, match=message) as err:
                    client.submit(rid, batch)
                assert err.value.code == code
            client.submit(run_id, images[:1])
            with pytest.raises(RewardServiceError, match="already submitted"):
                client.submit(run_id, images[:1])

        channel = grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        start = channel.unary_unary("/deepgen.eval.v1.EvalService/StartRun")
        with pytest.raises(grpc.RpcError) as err:
            start(b"\xff\xff\xff", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "StartRunRequest" in err.value.details()
        channel.close()

        http = httpx.Client(base_url=service.http_url, timeout=30)
        secret = run_id.secret
        too_many = {"run_secret": secret, "images": [{"prompt_id": "0", "image": {"data": "aGk="}}] * 5}
        base64_error = {"run_secret": secret, "images": [{"prompt_id": "0", "image": {"data": "!!"}}]}
        bad = [
            ("/v1/runs", {"step": -1}, 422, "step"),
            ("/v1/runs", {"step": 1, "extra": 1}, 422, "extra"),
            ("/v1/runs", {"step": 1, "duplicates": 65}, 422, "duplicates"),
            (f"/v1/runs/{run_id}/images", base64_error, 400, "base64"),
            (f"/v1/runs/{run_id}/images", {"run_secret": secret, "images": []}, 400, "images is empty"),
            (f"/v1/runs/{run_id}/images", too_many, 400, "MAX_BATCH_SIZE"),
        ]
        for path, body, status, message in bad:
            reply = http.post(path, json=body)
            assert reply.status_code == status, reply.text
            assert message in reply.json()["error"]["message"]
        assert (
            http.post("/v1/runs", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        )

        undecodable = {
            "run_secret": secret,
            "images": [{"prompt_id": images[1].prompt_id, "image": {"data": "aGVsbG8="}}],
        }
        assert http.post(f"/v1/runs/{run_id}/images", json=undecodable).json() == {"accepted": 1}
        summary = http.post(f"/v1/runs/{run_id}/finish", json={"run_secret": secret}).json()
        assert (summary["images_judged"], summary["errors"]) == (1, 1)  # the bad image is an error row
        assert http.post(f"/v1/runs/{run_id}/finish", json={"run_secret": secret}).status_code == 404
        assert http.get("/v1/prompts").status_code == 200  # still serving
        http.close()
    finally:
        service.stop()


def test_sleep_mode_switches_the_judge_and_its_peer_around_a_run(vllm_server: VllmServer, tmp_path: Path):
    """vLLM on CPU frees nothing when asleep, but its dev endpoints exist: the proxies record which
    server the adapter puts to sleep and wakes, and when."""
    upstream = vllm_server.base_url.removesuffix("/v1")
    judge, peer = ForcingProxy(upstream, forcer(EN)).start(), ForcingProxy(upstream, forcer(EN)).start()
    service = start_eval(
        judge.base_url, tmp_path, prompt_limit=2, sleep_between_runs=True, peer_judge_url=peer.root_url
    )
    try:
        assert judge.other_calls == ["POST /sleep"]  # asleep until the first run
        with EvalClient(service.http_url) as client:
            run_id = client.start_run(step=0)
            assert (judge.other_calls[1:], peer.other_calls) == (["POST /wake_up"], ["POST /sleep"])
            client.submit(run_id, generate(client))
            summary = client.finish(run_id)
        assert (judge.other_calls[2:], peer.other_calls[1:]) == (["POST /sleep"], ["POST /wake_up"])
    finally:
        service.stop()
        judge.stop()
        peer.stop()
        httpx.post(f"{upstream}/wake_up", timeout=30)
    assert summary.images_judged == 2
    assert not math.isnan(summary.overall_accuracy)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_grpc_stream_messages_are_parsed_one_by_one(proxy: ForcingProxy, tmp_path: Path):
    """A raw client stream whose second message is garbage: the first batch is accepted (and judged),
    the call fails with INVALID_ARGUMENT naming the message type."""
    service = start_eval(proxy.base_url, tmp_path, prompt_limit=2)
    try:
        with EvalClient(service.grpc_url) as client:
            images = generate(client)
            run_id = client.start_run(step=0)
        channel = grpc.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        submit = channel.stream_unary("/deepgen.eval.v1.EvalService/SubmitImages")
        first = eval_pb2.SubmitImagesRequest(
            run_id=run_id.run_id,
            run_secret=run_id.secret,
            images=[eval_pb2.GeneratedImage(prompt_id=images[0].prompt_id)],
        )
        first.images[0].image.data = images[0].image
        with pytest.raises(grpc.RpcError) as err:
            submit(iter([first.SerializeToString(), b"\xff\xff\xff"]), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "SubmitImagesRequest" in err.value.details()
        channel.close()
        with EvalClient(service.grpc_url) as client:
            summary = client.finish(run_id)
    finally:
        service.stop()
    assert summary.images_judged == 1


@pytest.mark.parametrize(("rules", "judged", "failures"), [("official", 0, 2), ("tolerant", 2, 0)])
def test_one_service_serves_several_sets_and_reads_answers_under_the_configured_rules(
    vllm_server: VllmServer, tmp_path: Path, rules: str, judged: int, failures: int
):
    """The zh answers lack <analysis>: the official rules reject them (retried, then parse failures),
    the tolerant ones accept them. The summary says which rules were used and which set was run."""
    english = forcer(EN)

    def force(text: str) -> str:
        item = next((i for i in ZH if i.prompt in text), None)
        if item is None:
            return english(text)
        return re.escape(f"<score>[{', '.join(map(str, forced_scores(item)))}]</score>")

    proxy = ForcingProxy(vllm_server.base_url.removesuffix("/v1"), force).start()
    service = start_eval(
        proxy.base_url, tmp_path, benchmark="test_prompts_en,test_prompts_zh", prompt_limit=2, parse_retries=1,
        unigenbench_answer_rules=rules,
    )  # fmt: skip
    try:
        with EvalClient(service.grpc_url) as client:
            assert [p for p, _ in client.prompts().prompts] == [i.prompt_id for i in EN[:2]]  # the first set
            listed = client.prompts("zh")
            assert [p for p, _ in listed.prompts] == [i.prompt_id for i in ZH[:2]]
            run_id = client.start_run(step=4, benchmark="zh")
            client.submit(run_id, [EvalImage(pid, 0, png(n)) for n, (pid, _) in enumerate(listed.prompts)])
            summary = client.finish(run_id)
            with pytest.raises(RewardServiceError, match="benchmark 'fr' is not served; valid: en, zh"):
                client.start_run(step=4, benchmark="fr")
    finally:
        service.stop()
        proxy.stop()
    assert (summary.benchmark, summary.answer_rules) == ("zh", rules)
    assert (summary.images_judged, summary.parse_failures) == (judged, failures)
    assert [(v.prompt_id, v.status) for v in summary.images] == [
        (i.prompt_id, "ok" if judged else "parse_failure") for i in ZH[:2]
    ]
    if judged:
        assert [v.scores for v in summary.images] == [forced_scores(i) for i in ZH[:2]]
    else:
        assert all("missing_tag" in v.detail for v in summary.images)
    assert len(proxy.chat_texts) == 2 * (1 if judged else 2)  # official: 1 + PARSE_RETRIES asks each
    written = json.loads((tmp_path / f"step-0000004-{run_id}" / "summary.json").read_text())
    assert (written["answer_rules"], written["benchmark"]) == (rules, "zh")


# --- finding 6 of issue 8: bounded numbers, results written before a run is forgotten, idle runs
# expire, and a run belongs to whoever started it ----------------------------------------------------


def test_out_of_range_step_is_refused_and_the_largest_step_round_trips(proxy: ForcingProxy, tmp_path: Path):
    # On main, step = 10^250 was accepted, then FinishRun answered 500 and the run's results were lost.
    service = start_eval(proxy.base_url, tmp_path, prompt_limit=1)
    try:
        reply = httpx.post(f"{service.http_url}/v1/runs", json={"step": 10**250}, timeout=30)
        assert reply.status_code == 422
        assert "step" in reply.json()["error"]["message"]
        with EvalClient(service.grpc_url) as client:
            with pytest.raises(RewardServiceError, match=r"step must be in 0\.\.2147483647") as err:
                client.start_run(step=2**62)
            assert err.value.code == "INVALID_ARGUMENT"
            with pytest.raises(RewardServiceError, match=r"duplicates must be in 1\.\.64 \(0: DUPLICATES\), got 65"):
                client.start_run(step=1, duplicates=65)
            run = client.start_run(step=2**31 - 1)
            client.submit(run, generate(client))
            summary = client.finish(run)
    finally:
        service.stop()
    assert (summary.step, summary.images_judged) == (2**31 - 1, 1)
    assert (tmp_path / f"step-2147483647-{run}" / "summary.json").exists()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_only_the_holder_of_the_run_secret_can_submit_and_finish(proxy: ForcingProxy, tmp_path: Path, transport: str):
    service = start_eval(proxy.base_url, tmp_path, prompt_limit=2)
    url = service.grpc_url if transport == "grpc" else service.http_url
    try:
        with EvalClient(url) as owner, EvalClient(url) as stranger:
            images = generate(owner)
            run = owner.start_run(step=5)
            assert run.secret
            assert run.secret not in repr(run)
            for forged in (EvalRun(run.run_id, ""), EvalRun(run.run_id, run.secret[:-1] + "x")):
                with pytest.raises(RewardServiceError, match=r"is not open .* or its run secret is wrong") as err:
                    stranger.submit(forged, images[:1])
                assert err.value.code == "NOT_FOUND"
                with pytest.raises(RewardServiceError, match="run secret is wrong") as err:
                    stranger.finish(forged)
                assert err.value.code == "NOT_FOUND"
            assert owner.submit(run, images) == 2  # nothing of the stranger's was accepted
            summary = owner.finish(run)
    finally:
        service.stop()
    assert summary.images_judged == 2


def test_results_are_written_before_the_run_is_forgotten(proxy: ForcingProxy, tmp_path: Path):
    results = tmp_path / "results"
    results.write_text("a file where the results folder should be")  # every write fails
    service = start_eval(proxy.base_url, results, prompt_limit=2)
    try:
        with EvalClient(service.http_url) as client:
            run = client.start_run(step=7)
            client.submit(run, generate(client))
            with pytest.raises(TransientError, match=r"could not write the results of run .* call FinishRun again"):
                client.finish(run)
            results.unlink()
            summary = client.finish(run)  # the run stayed open with its judgements
    finally:
        service.stop()
    assert summary.images_judged == 2
    assert sorted(p.name for p in results.iterdir()) == [f"step-0000007-{run}"]  # no partial folder left
    assert json.loads((results / f"step-0000007-{run}" / "summary.json").read_text())["images_judged"] == 2


def test_idle_runs_expire_with_their_results_written(proxy: ForcingProxy, tmp_path: Path):
    # On main, four idle runs blocked StartRun with 429 for an hour.
    service = start_eval(proxy.base_url, tmp_path, prompt_limit=2, max_open_runs=1, run_idle_timeout_s=1.0)
    try:
        with EvalClient(service.grpc_url, retry=RetryPolicy(max_attempts=1)) as client:
            images = generate(client)
            abandoned = client.start_run(step=1)
            client.submit(abandoned, images[:1])
            with pytest.raises(TransientError, match="MAX_OPEN_RUNS=1"):
                client.start_run(step=2)
            wait_for(lambda: "deepgen_eval_open_runs 0.0" in metrics_text(service), "the idle run to expire")
            with pytest.raises(RewardServiceError, match="is not open") as err:
                client.submit(abandoned, images[1:])
            assert err.value.code == "NOT_FOUND"
            run = client.start_run(step=2)
            client.submit(run, images)
            assert client.finish(run).images_judged == 2
        metrics = metrics_text(service)
    finally:
        service.stop()
    expired = tmp_path / f"step-0000001-{abandoned}-expired"
    assert json.loads((expired / "summary.json").read_text())["images_judged"] == 1
    assert 'deepgen_eval_runs_total{status="expired"} 1.0' in metrics


def metrics_text(service: ServiceThread) -> str:
    return httpx.get(f"{service.http_url}/metrics", timeout=10).text
