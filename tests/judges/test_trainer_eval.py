"""The trainer's evaluation against the real chain: tiny DeepGen → eval-unigenbench (gRPC, client-streamed
images) → a real vLLM judge on CPU whose answers are forced per prompt (tests/judges/forcing_proxy.py).
Two sets, as the original's eval YAML writes them: each entry's `path` names the set the service
serves, with its own duplicates, evaluated and logged under its own name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from deepgen_trainer.config import ConfigError, parse_args
from deepgen_trainer.evaluation.evaluate import original_dimension_key
from deepgen_trainer.observe.contact_sheet import sheet_size
from deepgen_trainer.run import evaluation_plans
from deepgen_trainer.train import train
from tests.helpers import PROMPT_FIXTURES
from tests.judges.forcing_proxy import ForcingProxy
from tests.judges.unigenbench_forcing import EN, ZH, expected_accuracies, forcer, start_eval
from tests.judges.vllm_server import VllmServer

pytestmark = pytest.mark.integration

EVAL_YAML = """datasets:
  - name: bench_en
    path: unigenbench/test_prompts_en.csv
    scoring: unigenbench/en
    cfg_scale: 2.0
    num_inference_steps: 3
    duplicates: 2
  - name: bench_zh
    path: unigenbench/test_prompts_zh.csv
    scoring: unigenbench/zh
    num_inference_steps: 2
"""


def test_training_evaluates_two_sets_with_their_own_duplicates(vllm_server: VllmServer, tmp_path: Path):
    proxy = ForcingProxy(vllm_server.base_url.removesuffix("/v1"), forcer(EN[:3] + ZH[:3])).start()
    # The service's own DUPLICATES is 1: the YAML's duplicates travel with each run.
    service = start_eval(
        proxy.base_url, tmp_path / "results", prompt_limit=3, benchmark="test_prompts_en,test_prompts_zh"
    )
    yaml = tmp_path / "train.yaml"
    yaml.write_text(f"datasets:\n  - path: {PROMPT_FIXTURES / 'geneval.txt'}\n    rewards: [{{clip_sim: 1.0}}]\n")
    eval_yaml = tmp_path / "eval.yaml"
    eval_yaml.write_text(EVAL_YAML)
    out = tmp_path / "run"
    args = ["--model", "tiny", "--report_to", "none", "--no-bf16", "--deepspeed", "none", "--rollout_n", "2",
            "--prompts_per_rank", "1", "--rollout_micro_batch_size", "2", "--atrain_micro_batch_size", "2",
            "--num_inference_steps", "4", "--image_height", "64", "--image_width", "64", "--max_steps", "2",
            "--eval_freq", "2", "--eval_before_train", "--dataset_config", str(yaml),
            "--unigenbench_api_url", service.grpc_url, "--output_dir", str(out)]  # fmt: skip
    try:
        # A set the service does not serve stops the run at start, naming the sets it serves.
        unserved = tmp_path / "unserved.yaml"
        unserved.write_text(EVAL_YAML.replace("test_prompts_zh.csv", "test_prompts_zh_long.csv"))
        with pytest.raises(ConfigError, match=r"set 'zh_long' .* not served; valid: en, zh"):
            evaluation_plans(parse_args([*args, "--eval_dataset_config", str(unserved)], environ={}))
        train(parse_args([*args, "--eval_dataset_config", str(eval_yaml)], environ={}))
    finally:
        service.stop()
        proxy.stop()
    rows = {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    for name, items, duplicates, served in (("bench_en", EN[:3], 2, "en"), ("bench_zh", ZH[:3], 1, "zh")):
        sub, primary, pooled = expected_accuracies(items)
        for step in (0, 2):
            row = rows[step]
            assert row[f"eval/{name}/images_judged"] == 3 * duplicates
            # The leaderboard's Overall: the mean of the primary dimensions, not the pooled accuracy.
            assert row[f"eval/{name}/overall"] == pytest.approx(sum(primary.values()) / len(primary))
            assert row[f"eval/{name}/pooled"] == pytest.approx(pooled)
            for dim, accuracy in primary.items():
                assert row[f"eval/{name}/primary/{dim}"] == pytest.approx(accuracy)
            # The original's names, next to ours.
            assert row[f"eval/{name}/overall_accuracy"] == pytest.approx(pooled)
            assert row[f"eval/{name}/success_rate"] == 1.0
            for dim, accuracy in sub.items():
                assert row[f"eval/{name}/{original_dimension_key(dim)}"] == pytest.approx(accuracy)
            folder = out / "eval" / name / f"step-{step:07d}"
            summary = json.loads((folder / "summary.json").read_text())
            assert (summary["benchmark"], summary["images_judged"]) == (served, 3 * duplicates)
            with Image.open(folder / "contact_sheet.png") as sheet:
                assert (sheet.format, sheet.size) == ("PNG", sheet_size(3))
            assert len((folder / "results.csv").read_text().splitlines()) == 1 + 3 * duplicates
    assert "eval/bench_en/overall" not in rows[1]
    assert len(proxy.chat_texts) == 2 * (6 + 3)  # two evaluations of 6 + 3 images, each judged once
