"""The trainer's evaluation against the real chain: tiny DeepGen → eval-unigenbench (gRPC, client-streamed
images) → a real vLLM judge on CPU whose answers are forced per prompt (tests/judges/forcing_proxy.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from deepgen_trainer.config import parse_args
from deepgen_trainer.observe.contact_sheet import sheet_size
from deepgen_trainer.train import train
from tests.helpers import PROMPT_FIXTURES
from tests.judges.forcing_proxy import ForcingProxy
from tests.judges.unigenbench_forcing import EN, expected_accuracies, forcer, start_eval
from tests.judges.vllm_server import VllmServer

pytestmark = pytest.mark.integration


def test_training_evaluates_before_and_every_eval_freq_steps(vllm_server: VllmServer, tmp_path: Path):
    proxy = ForcingProxy(vllm_server.base_url.removesuffix("/v1"), forcer(EN)).start()
    service = start_eval(proxy.base_url, tmp_path / "results", prompt_limit=3, duplicates=2)
    yaml = tmp_path / "train.yaml"
    prompts = PROMPT_FIXTURES / "geneval.txt"
    yaml.write_text(f"datasets:\n  - path: {prompts}\n    rewards: {{clip_sim: 1.0}}\n")
    eval_yaml = tmp_path / "eval.yaml"
    eval_yaml.write_text(
        f"datasets:\n  - name: unigenbench\n    path: {prompts}\n    scoring: unigenbench\n"
        "    cfg_scale: 2.0\n    num_inference_steps: 3\n"
    )
    out = tmp_path / "run"
    try:
        cfg = parse_args(
            ["--model", "tiny", "--report_to", "none", "--no-bf16", "--deepspeed", "none", "--rollout_n", "2",
             "--prompts_per_rank", "1", "--rollout_micro_batch_size", "2", "--atrain_micro_batch_size", "2",
             "--num_inference_steps", "4", "--image_height", "64", "--image_width", "64", "--max_steps", "2",
             "--eval_freq", "2", "--eval_before_train", "--dataset_config", str(yaml),
             "--eval_dataset_config", str(eval_yaml), "--unigenbench_api_url", service.grpc_url,
             "--output_dir", str(out)],
            environ={},
        )  # fmt: skip
        train(cfg)
    finally:
        service.stop()
        proxy.stop()
    rows = {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    _, primary, pooled = expected_accuracies(EN[:3])
    for step in (0, 2):
        assert rows[step]["eval/unigenbench/images_judged"] == 6  # 3 prompts × 2 duplicates
        # The leaderboard's Overall: the mean of the primary dimensions, not the pooled accuracy.
        assert rows[step]["eval/unigenbench/overall"] == pytest.approx(sum(primary.values()) / len(primary))
        assert rows[step]["eval/unigenbench/pooled"] == pytest.approx(pooled)
        for name, accuracy in primary.items():
            assert rows[step][f"eval/unigenbench/primary/{name}"] == pytest.approx(accuracy)
        folder = out / "eval" / "unigenbench" / f"step-{step:07d}"
        summary = json.loads((folder / "summary.json").read_text())
        assert (summary["answer_rules"], summary["benchmark"], summary["images_judged"]) == ("official", "en", 6)
        with Image.open(folder / "contact_sheet.png") as sheet:
            assert (sheet.format, sheet.size) == ("PNG", sheet_size(3))
        assert len((folder / "results.csv").read_text().splitlines()) == 7
    assert "eval/unigenbench/overall" not in rows[1]
    assert len(proxy.chat_texts) == 12  # two runs of 6 images, each judged once
    runs = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert [r.split("-")[1] for r in runs] == ["0000000", "0000002"]
