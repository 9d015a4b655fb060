"""`make eval` end to end: a tiny RL checkpoint → images (ODE, the training evaluation's seeds) →
eval-unigenbench (two sets, gRPC) → a real vLLM judge on CPU whose answers are forced per prompt
(tests/judges/forcing_proxy.py). The first run is killed while judging; the second resumes without
generating or judging again what it has; the third only prints the table beside BASELINE."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from deepgen_trainer.checkpoints.run_checkpoint import save_checkpoint
from deepgen_trainer.config import TrainConfig
from deepgen_trainer.model.tiny import build_tiny
from deepgen_trainer.observe.contact_sheet import sheet_size
from tests.helpers import REPO
from tests.judges.forcing_proxy import ForcingProxy
from tests.judges.unigenbench_forcing import EN, ZH, expected_accuracies, forced_scores, forcer, start_eval
from tests.judges.vllm_server import VllmServer

pytestmark = pytest.mark.integration

PROMPTS, DUPLICATES = 3, 2
IMAGES_PER_SET = PROMPTS * DUPLICATES


def tiny_run(folder: Path) -> Path:
    """An RL run of the tiny model with one checkpoint whose DiT differs from the initial one."""
    cfg = TrainConfig(model="tiny", seed=3, image_height=64, image_width=64, num_inference_steps=3, eval_cfg_scale=2.0)
    model = build_tiny(seed=3)
    dit = model.transformer.state_dict()
    trained = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in dit.items()}
    save_checkpoint(folder, 5, trainable=trained, deepgen_only=model.deepgen_only_state(), config=cfg.to_dict())
    return folder


def make_eval(url: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "UNIGENBENCH_API_URL": url}
    return subprocess.Popen(
        ["make", "-C", str(REPO), "--no-print-directory", "eval", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def settled_calls(proxy: ForcingProxy, quiet_s: float = 3.0) -> int:
    """The judge calls so far, once none has arrived for `quiet_s`."""
    count, since = len(proxy.chat_texts), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        if len(proxy.chat_texts) != count:
            count, since = len(proxy.chat_texts), time.monotonic()
    return count


def verdict_lines(folder: Path) -> int:
    path = folder / "verdicts.jsonl"
    return len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0


def test_make_eval_resumes_after_an_interruption_and_compares_with_a_baseline(vllm_server: VllmServer, tmp_path: Path):
    proxy = ForcingProxy(vllm_server.base_url.removesuffix("/v1"), forcer(EN + ZH)).start()
    service = start_eval(
        proxy.base_url, tmp_path / "service", benchmark="test_prompts_en,test_prompts_zh",
        prompt_limit=PROMPTS, duplicates=DUPLICATES,
    )  # fmt: skip
    run = tiny_run(tmp_path / "run")
    out = tmp_path / "eval"
    args = [f"CKPT={run}", "SETS=en,zh", f"OUT={out}", "ARGS=--judge_batch 2 --batch_size 4"]
    try:
        # 1. interrupted: killed as soon as the first judging run of "en" is recorded
        first = make_eval(service.grpc_url, *args)
        deadline = time.monotonic() + 300
        while verdict_lines(out / "en") == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        assert first.returncode == -signal.SIGKILL, first.stdout.read() if first.stdout else ""
        judged_before = verdict_lines(out / "en")
        assert 0 < judged_before < IMAGES_PER_SET
        images = sorted((out / "en" / "images").glob("*.png"))
        assert len(images) == IMAGES_PER_SET  # every image of the set was generated before judging
        stamps = {p.name: p.stat().st_mtime_ns for p in images}
        calls_before = settled_calls(proxy)  # the killed run's last submission is still being judged

        # 2. resumed: nothing generated or judged twice
        second = make_eval(service.grpc_url, *args)
        log, _ = second.communicate(timeout=600)
        assert second.returncode == 0, log
        assert {p.name: p.stat().st_mtime_ns for p in (out / "en" / "images").glob("*.png")} == stamps
        assert len(proxy.chat_texts) - calls_before == 2 * IMAGES_PER_SET - judged_before
        calls_after = len(proxy.chat_texts)

        # 3. everything is there: the table beside the baseline, no model, no judge call
        third = make_eval(service.grpc_url, *args, f"BASELINE={out}")
        table, _ = third.communicate(timeout=600)
        assert third.returncode == 0, table
        assert len(proxy.chat_texts) == calls_after
    finally:
        service.stop()
        proxy.stop()

    for set_name, items in (("en", EN[:PROMPTS]), ("zh", ZH[:PROMPTS])):
        folder = out / set_name
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        _, primary, pooled = expected_accuracies(items)
        assert (summary["benchmark"], summary["answer_rules"], summary["step"]) == (set_name, "official", 5)
        assert (summary["images_judged"], summary["parse_failures"], summary["errors"]) == (IMAGES_PER_SET, 0, 0)
        assert summary["primary_mean_accuracy"] == pytest.approx(sum(primary.values()) / len(primary))
        assert summary["overall_accuracy"] == pytest.approx(pooled)
        with (folder / "results.csv").open(encoding="utf-8", newline="") as file:
            rows = list(csv.DictReader(file))
        assert [(r["prompt_id"], r["duplicate"], r["status"]) for r in rows] == [
            (i.prompt_id, str(dup), "ok") for i in items for dup in range(DUPLICATES)
        ]
        assert json.loads(rows[0]["scores"]) == forced_scores(items[0])
        with Image.open(folder / "contact_sheet.png") as sheet:
            assert (sheet.format, sheet.size) == ("PNG", sheet_size(PROMPTS))
        assert f"UniGenBench {set_name}: {IMAGES_PER_SET} images judged" in table
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("dimension"))
    assert header.split() == ["dimension", "checkpoint", "baseline", "delta"]
    overall = [line for line in lines if line.startswith("Overall (mean of primary)")]
    assert len(overall) == 2
    assert all(line.split()[-1] == "+0.00" for line in overall)
    assert (out / "en" / "table.txt").read_text(encoding="utf-8") in table
    settings = json.loads((out / "eval_config.json").read_text(encoding="utf-8"))
    assert (settings["model"], settings["num_inference_steps"], settings["eval_cfg_scale"]) == ("tiny", 3, 2.0)
