"""A run started with the original DeepGen-RL's three config files (its train YAML, eval YAML and SFT-aux
MMEngine config, named by DATASET_CONFIG, EVAL_DATASET_CONFIG and SFTAUX_DATASET_CONFIG as its
scripts/train.sh does) trains the tiny DeepGen with all three of its rewards and SFT-aux, and evaluates
the set its eval YAML names with the YAML's duplicates: the real reward-ocr, reward-unified and
eval-unigenbench, both judges on the vLLM-on-CPU server with forced answers.

The files are copied unchanged beside stand-in data in the original's formats, with one exception:
processors.py's image_size 512 becomes 64, because the tiny DiT's position embedding covers 128 px
(its SFT images would be 512² otherwise)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from deepgen_trainer.config import parse_args
from deepgen_trainer.original.mmengine_config import read_mmengine_config
from deepgen_trainer.train import train
from tests.helpers import original_files
from tests.judges.forcing_proxy import ForcingProxy
from tests.judges.test_reward_unified import adapter
from tests.judges.unigenbench_forcing import EN, expected_accuracies, forcer, start_eval
from tests.judges.vllm_server import VllmServer
from tests.trainer.data.test_sftaux_mmengine import SFTAUX_DIR, stand_in_data

pytestmark = pytest.mark.integration

ASSETS = Path("assets/rl_datasets/deepgen")
FIRST_WINS = {"structured_outputs": {"regex": re.escape("<answer>Image 1 is better</answer>")}}


def original_configs(tmp_path: Path, monkeypatch) -> dict[str, str]:
    """The three files in a copy of the original's layout, with stand-in prompts and SFT data."""
    original = original_files()
    assets = tmp_path / ASSETS
    shutil.copytree(original / ASSETS, assets)
    for k, item in enumerate(yaml.safe_load((assets / "deepgen_train.yaml").read_text())["datasets"]):
        lines = [f'a poster that says "hello {k}"', f"a small red cube number {k}", f'a sign reading "open {k}"']
        (assets / item["path"]).write_text("\n".join(lines) + "\n")
    sft = tmp_path / SFTAUX_DIR
    shutil.copytree(original / SFTAUX_DIR, sft)
    processors = sft / "processors.py"
    processors.write_text(processors.read_text().replace("image_size = 512", "image_size = 64"))
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "data"))
    stand_in_data(read_mmengine_config(sft / "t2i_grpo_moretextdata.py"), tmp_path / "data")
    return {
        "DATASET_CONFIG": str(assets / "deepgen_train.yaml"),
        "EVAL_DATASET_CONFIG": str(assets / "eval" / "eval.yaml"),
        "SFTAUX_DATASET_CONFIG": str(sft / "t2i_grpo_moretextdata.py"),
    }


def test_the_originals_three_config_files_train_and_evaluate(
    vllm_server: VllmServer, ocr_service, tmp_path: Path, monkeypatch
) -> None:
    environ = original_configs(tmp_path, monkeypatch)
    proxy = ForcingProxy(vllm_server.base_url.removesuffix("/v1"), forcer(EN[:2])).start()
    evaluator = start_eval(proxy.base_url, tmp_path / "results", prompt_limit=2)  # the service's DUPLICATES: 1
    unified = adapter(vllm_server, FIRST_WINS)
    out = tmp_path / "run"
    environ |= {
        "OCR_URL": ocr_service.grpc_url, "UNIFIEDREWARD_THINK_URL": unified.grpc_url,
        "UNIGENBENCH_API_URL": evaluator.grpc_url, "OUTPUT_DIR": str(out),
    }  # fmt: skip
    args = ["--model", "tiny", "--report_to", "none", "--no-bf16", "--deepspeed", "none", "--rollout_n", "2",
            "--prompts_per_rank", "2", "--rollout_micro_batch_size", "2", "--atrain_micro_batch_size", "2",
            "--num_inference_steps", "4", "--image_height", "64", "--image_width", "64", "--max_steps", "2",
            "--eval_freq", "2", "--eval_image_height", "64", "--eval_image_width", "64"]  # fmt: skip
    try:
        train(parse_args(args, environ=environ))
    finally:
        unified.stop()
        evaluator.stop()
        proxy.stop()
    rows = {row["step"]: row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    for step in (1, 2):
        assert rows[step]["sft/loss"] > 0
        for reward in ("ocr", "clip_sim", "unifiedreward_think"):
            assert rows[step][f"reward/{reward}/fail_rate"] == 0
    # The eval YAML's one entry: set en (from its path), 4 duplicates (the YAML's, not the service's 1).
    _, primary, pooled = expected_accuracies(EN[:2])
    assert rows[2]["eval/unigenbench_en/images_judged"] == 2 * 4
    assert rows[2]["eval/unigenbench_en/overall_accuracy"] == pytest.approx(pooled)
    assert rows[2]["eval/unigenbench_en/overall"] == pytest.approx(sum(primary.values()) / len(primary))
