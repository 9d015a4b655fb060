"""The original DeepGen-RL's shipped data configs, unchanged, over small stand-in data written in its
formats: the train YAML (rewards as lists of one-key maps, sampling_mode), the eval YAML (scoring
unigenbench/<lang>, path naming the set, duplicates)."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from deepgen_trainer.data.prompt_sampler import PromptSampler
from deepgen_trainer.data.prompts import DataConfigError, load_eval_data, load_train_data
from tests.helpers import original_files

REWARDS = ("clip_sim", "ocr", "unifiedreward_think")
TRAIN_YAML = Path("assets/rl_datasets/deepgen/deepgen_train.yaml")


def stand_in_train_data(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """The shipped train YAML copied unchanged beside stand-in .txt prompt files of distinct sizes (four
    of its seven files are not in the original's repository)."""
    shipped = original_files() / TRAIN_YAML
    config = tmp_path / "deepgen_train.yaml"
    shutil.copy(shipped, config)
    sizes = {}
    for k, item in enumerate(yaml.safe_load(shipped.read_text())["datasets"]):
        sizes[item["name"]] = 3 + 2 * k
        lines = [f"{item['name']} prompt {i}" for i in range(sizes[item["name"]])]
        (tmp_path / item["path"]).write_text("\n".join(lines) + "\n")
    return config, sizes


@pytest.mark.parametrize("mode", ["sample_proportional", "weight_only"])
def test_shipped_train_yaml_loads_with_the_original_probabilities(tmp_path: Path, mode: str) -> None:
    config, sizes = stand_in_train_data(tmp_path)
    if mode == "weight_only":  # the shipped file says sample_proportional; the other rule, same file otherwise
        config.write_text(config.read_text().replace("sampling_mode: sample_proportional", f"sampling_mode: {mode}"))
    data = load_train_data(config, REWARDS)
    raw = yaml.safe_load(config.read_text())["datasets"]
    assert [d.name for d in data.datasets] == [item["name"] for item in raw]
    # ORIGINAL.md §7.1: sample_proportional p(d) = w_d·n_d / Σ w·n; weight_only p(d) = w_d / Σ w.
    mass = [item["sample_weight"] * (sizes[item["name"]] if mode == "sample_proportional" else 1) for item in raw]
    expected = [m / math.fsum(mass) for m in mass]
    assert data.dataset_probabilities() == pytest.approx(expected, rel=1e-12)
    # The text-rendering sets keep their three rewards, the general sets their two (list form merged).
    assert dict(data.datasets[0].rewards) == {"unifiedreward_think": 0.2, "clip_sim": 0.1, "ocr": 0.7}
    assert dict(data.datasets[3].rewards) == {"unifiedreward_think": 0.7, "clip_sim": 0.3}
    # The sampler draws the datasets with those probabilities (20 000 draws: 4 σ ≈ 0.014 at p = 0.5).
    sampler = PromptSampler(data, prompts_per_rank=100, seed=0, rank=0, world_size=1)
    counts: Counter[int] = Counter()
    for _ in range(200):
        counts.update(next(sampler).dataset_indices)
    total = sum(counts.values())
    for d, p in enumerate(expected):
        assert counts[d] / total == pytest.approx(p, abs=0.015)


def test_reward_list_items_must_be_one_key_maps(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a\nb\n")
    config = tmp_path / "t.yaml"
    for rewards, problem in (
        ("[ocr]", "must be a one-key map"),
        ("[{ocr: 0.5, clip_sim: 0.5}]", "must be a one-key map"),
        ("[{ocr: 0.5}, {ocr: 0.7}]", "datasets[0].rewards[1].ocr: listed twice"),
        ("[{ocrr: 0.5}]", "datasets[0].rewards.ocrr: unknown reward"),
    ):
        config.write_text(f"datasets:\n  - path: p.txt\n    rewards: {rewards}\n")
        with pytest.raises(DataConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
            load_train_data(config, REWARDS)


def test_shipped_eval_yaml_names_its_set_language_and_duplicates(tmp_path: Path) -> None:
    shipped = original_files() / "assets/rl_datasets/deepgen/eval/eval.yaml"
    data = load_eval_data(shipped)  # unchanged; the CSV it names lives with eval-unigenbench
    (entry,) = data.datasets
    assert (entry.name, entry.benchmark, entry.language) == ("unigenbench_en", "en", "en")
    assert (entry.duplicates, entry.cfg_scale, entry.num_inference_steps) == (4, 4.0, 50)
    # Its commented-out sets, uncommented: each names its own set and judge language.
    config = tmp_path / "eval.yaml"
    config.write_text(shipped.read_text().replace("  # ", "  "))
    assert [(d.name, d.benchmark, d.language) for d in load_eval_data(config).datasets] == [
        ("unigenbench_en", "en", "en"),
        ("unigenbench_en_long", "en_long", "en"),
        ("unigenbench_zh", "zh", "zh"),
        ("unigenbench_zh_long", "zh_long", "zh"),
    ]
