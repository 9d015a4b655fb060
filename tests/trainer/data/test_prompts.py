"""deepgen_trainer.data.prompts and .sftaux_data: prompt files, train/eval/SFT-aux YAML, errors that say how to fix."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from deepgen_trainer.data.prompts import (
    DataConfigError,
    load_eval_data,
    load_train_data,
    read_prompt_records,
    read_prompts,
)
from deepgen_trainer.data.sftaux import SftAuxLoader, load_sftaux_data, target_size
from tests.helpers import JUDGE_FIXTURES, PROMPT_FIXTURES

REWARDS = ("clip_sim", "ocr", "unifiedreward_think")
PROMPTS = ["a red cube", 'a sign that says "hello"', "two cats"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_prompt_file(path: Path, prompts: list[str]) -> Path:
    """``prompts`` in the format of ``path``'s suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".txt":
        write(path, "\n\n".join(prompts) + "\n")  # blank lines in between are skipped
    elif path.suffix == ".jsonl":
        write(path, "".join(json.dumps({"caption": p, "extra": 1}) + "\n" for p in prompts))
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "prompt"])
            writer.writerows([[i, p] for i, p in enumerate(prompts)])
    else:
        pq.write_table(pa.table({"prompt": prompts}), path)
    return path


def train_yaml(tmp_path: Path, body: str) -> Path:
    write_prompt_file(tmp_path / "prompts" / "a.txt", PROMPTS)
    write_prompt_file(tmp_path / "prompts" / "b.txt", ["b1", "b2"])
    return write(tmp_path / "configs" / "train.yaml", body)


GOOD_TRAIN = """
sampling_mode: weight_only
datasets:
  - name: general
    path: ../prompts/a.txt
    sample_weight: 2
    rewards: {unifiedreward_think: 1.0, clip_sim: 0.5}
  - path: ../prompts/b.txt
    rewards: {ocr: 1.0}
"""


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_every_prompt_format_loads(tmp_path: Path, suffix: str) -> None:
    path = write_prompt_file(tmp_path / f"p{suffix}", [*PROMPTS, "  "])
    assert read_prompts(path) == tuple(PROMPTS)


def test_unigenbench_csv_keeps_its_index_as_prompt_id() -> None:
    records = read_prompt_records(JUDGE_FIXTURES / "unigenbench" / "test_prompts_en.csv")
    assert records[0][0] == "0"
    assert records[1][1] == "A cat sleeping on a blue sofa, photographed from above."
    assert len({i for i, _ in records}) == len(records)


def test_prompt_list_files_load() -> None:
    files = sorted(PROMPT_FIXTURES.glob("*.txt"))
    assert len(files) == 3
    for path in files:
        prompts = read_prompts(path)
        # Every non-blank line is one prompt.
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        assert len(prompts) == len(lines) >= 8
        assert all(p == p.strip() and p for p in prompts)


def test_train_yaml_on_prompt_list_files(tmp_path: Path) -> None:
    prompts_dir = PROMPT_FIXTURES
    config = write(
        tmp_path / "train.yaml",
        f"""
sampling_mode: sample_proportional
datasets:
  - name: general
    path: {prompts_dir / "general.txt"}
    rewards: {{unifiedreward_think: 1.0}}
  - name: ocr
    path: {prompts_dir / "ocr.txt"}
    rewards: {{ocr: 1.0, unifiedreward_think: 1.0}}
""",
    )
    data = load_train_data(config, REWARDS)
    assert [len(d.prompts) for d in data.datasets] == [21, 10]
    assert data.reward_names == ("unifiedreward_think", "ocr")


def test_train_yaml_loads_with_paths_relative_to_the_yaml(tmp_path: Path) -> None:
    data = load_train_data(train_yaml(tmp_path, GOOD_TRAIN), REWARDS)
    assert data.sampling_mode == "weight_only"
    general, b = data.datasets
    assert general.path == tmp_path / "configs" / ".." / "prompts" / "a.txt"
    assert (general.name, general.prompts, general.sample_weight) == ("general", tuple(PROMPTS), 2.0)
    assert (b.name, b.sample_weight, dict(b.rewards)) == ("b", 1.0, {"ocr": 1.0})  # defaults: stem, weight 1


def test_reward_weight_vectors_follow_the_given_name_order(tmp_path: Path) -> None:
    data = load_train_data(train_yaml(tmp_path, GOOD_TRAIN), REWARDS)
    assert data.reward_names == ("unifiedreward_think", "clip_sim", "ocr")
    names = ["ocr", "clip_sim", "unifiedreward_think"]
    assert data.reward_weights(0, names) == (0.0, 0.5, 1.0)
    assert data.reward_weights(1, names) == (1.0, 0.0, 0.0)
    matrix = data.reward_weight_matrix([1, 0, 0], names)
    assert matrix.dtype == torch.float32
    assert matrix.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.5, 1.0], [0.0, 0.5, 1.0]]
    assert data.reward_weight_matrix([], names).shape == (0, 3)


def test_dataset_probabilities_of_both_modes(tmp_path: Path) -> None:
    data = load_train_data(train_yaml(tmp_path, GOOD_TRAIN), REWARDS)
    assert data.dataset_probabilities() == pytest.approx((2 / 3, 1 / 3))  # weight_only: 2 : 1
    proportional = load_train_data(
        train_yaml(tmp_path, GOOD_TRAIN.replace("weight_only", "sample_proportional")), REWARDS
    )
    assert proportional.dataset_probabilities() == pytest.approx((6 / 8, 2 / 8))  # 2·3 : 1·2


BAD_TRAIN = [
    # (replace this, with this, the error must contain these)
    (
        "sampling_mode: weight_only",
        "sampling_mode: weight_only\nshuffle: true",
        ["shuffle", "unknown key", "valid keys"],
    ),
    ("    sample_weight: 2", "    sample_wieght: 2", ["datasets[0].sample_wieght", "unknown key", "sample_weight"]),
    (
        "{ocr: 1.0}",
        "{ocrr: 1.0}",
        ["datasets[1].rewards.ocrr", "valid reward names: clip_sim, ocr, unifiedreward_think"],
    ),
    (
        "../prompts/b.txt",
        "../prompts/missing.txt",
        ["datasets[1].path", "missing.txt", "file not found", "check the path"],
    ),
    ("../prompts/b.txt", "../prompts/b.tsv", ["datasets[1].path", "unsupported", ".txt, .jsonl, .csv, .parquet"]),
    ("sample_weight: 2", "sample_weight: -1", ["datasets[0].sample_weight", "must be >= 0"]),
    ("sample_weight: 2", "sample_weight: abc", ["datasets[0].sample_weight", "finite number"]),
    ("{ocr: 1.0}", "{ocr: -0.5}", ["datasets[1].rewards.ocr", "must be >= 0"]),
    ("{ocr: 1.0}", "{ocr: 0}", ["datasets[1].rewards", "every reward weight is 0", "weight > 0"]),
    ("{ocr: 1.0}", "{}", ["datasets[1].rewards", "non-empty", "valid reward names"]),
    ("sampling_mode: weight_only", "sampling_mode: uniform", ["sampling_mode", "sample_proportional, weight_only"]),
    ("  - path: ../prompts/b.txt", "  - name: general\n    path: ../prompts/b.txt", ["datasets[1].name", "duplicate"]),
    ("    rewards: {ocr: 1.0}", "", ["datasets[1].rewards", "missing", "add 'rewards:'"]),
]


@pytest.mark.parametrize(("old", "new", "expected"), BAD_TRAIN)
def test_bad_train_yaml_names_file_key_and_fix(tmp_path: Path, old: str, new: str, expected: list[str]) -> None:
    assert old in GOOD_TRAIN
    path = train_yaml(tmp_path, GOOD_TRAIN.replace(old, new, 1))
    with pytest.raises(DataConfigError) as error:
        load_train_data(path, REWARDS)
    message = str(error.value)
    assert str(path) in message
    for part in expected:
        assert part in message


def test_all_zero_sample_weights_and_empty_datasets_are_errors(tmp_path: Path) -> None:
    path = train_yaml(tmp_path, GOOD_TRAIN.replace("sample_weight: 2", "sample_weight: 0") + "    sample_weight: 0\n")
    with pytest.raises(DataConfigError, match=r"datasets\[\*\]\.sample_weight: every weight is 0; give one"):
        load_train_data(path, REWARDS)
    path = train_yaml(tmp_path, GOOD_TRAIN)
    write(tmp_path / "prompts" / "b.txt", "\n  \n")
    with pytest.raises(DataConfigError, match=r"datasets\[1\]\.path: .*b.txt holds no prompts; point at"):
        load_train_data(path, REWARDS)


def test_missing_config_and_malformed_yaml(tmp_path: Path) -> None:
    with pytest.raises(DataConfigError, match="config file not found"):
        load_train_data(tmp_path / "nope.yaml", REWARDS)
    with pytest.raises(DataConfigError, match="invalid YAML"):
        load_train_data(write(tmp_path / "bad.yaml", "datasets: [\n"), REWARDS)
    with pytest.raises(DataConfigError, match="datasets: must be a non-empty list"):
        load_train_data(write(tmp_path / "empty.yaml", "datasets: []\n"), REWARDS)


def test_jsonl_without_a_prompt_key_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(DataConfigError, match=r"line 2: no prompt field \(found: text\); add a 'prompt'"):
        read_prompts(path)


# -------------------------------------------------------------------------------------------------- eval


def test_eval_yaml_scored_sets_and_generate_only_entries(tmp_path: Path) -> None:
    write_prompt_file(tmp_path / "geneval.txt", PROMPTS)
    path = write(
        tmp_path / "eval.yaml",
        """
datasets:
  - name: unigenbench_en
    path: unigenbench/test_prompts_en.csv   # lives with eval-unigenbench: not read here
    scoring: unigenbench/en
    cfg_scale: 5
    num_inference_steps: 30
    duplicates: 2
  - name: zh_long
    path: test_prompts_zh_long.csv
    scoring: {type: unigenbench, language: zh}
  - path: x/test_prompts_en_long.csv
    scoring: [{type: unigenbench}]
  - path: geneval.txt
""",
    )
    data = load_eval_data(path)
    bench, zh, en_long, geneval = data.datasets
    assert (bench.benchmark, bench.language, bench.cfg_scale, bench.num_inference_steps, bench.duplicates) == (
        "en", "en", 5.0, 30, 2
    )  # fmt: skip
    assert bench.prompts == ()
    assert (zh.benchmark, zh.language) == ("zh_long", "zh")
    assert (en_long.name, en_long.benchmark, en_long.language) == ("test_prompts_en_long", "en_long", "en")
    assert (geneval.name, geneval.benchmark, geneval.cfg_scale, geneval.num_inference_steps) == (
        "geneval", None, None, None
    )  # fmt: skip
    assert (geneval.prompt_ids, geneval.duplicates) == (("0", "1", "2"), 1)
    assert geneval.path == tmp_path / "geneval.txt"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("path: g.txt\n    scoring: geneval", ["datasets[0].scoring", "unknown scorer", "unigenbench/zh"]),
        ("path: g.txt\n    scoring: unigenbench/fr", ["datasets[0].scoring", "unknown language 'fr'"]),
        ("path: g.txt\n    duplicates: 0", ["datasets[0].duplicates", ">= 1"]),
        ("path: g.txt\n    steps: 3", ["datasets[0].steps", "unknown key"]),
        ("path: missing.txt", ["datasets[0].path", "file not found"]),
    ],
)
def test_bad_eval_yaml(tmp_path: Path, entry: str, expected: list[str]) -> None:
    write_prompt_file(tmp_path / "g.txt", PROMPTS)
    path = write(tmp_path / "eval.yaml", f"datasets:\n  - {entry}\n")
    with pytest.raises(DataConfigError) as error:
        load_eval_data(path)
    for part in expected:
        assert part in str(error.value)


# ----------------------------------------------------------------------------------------------- SFT-aux


def make_image(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)


def sftaux_yaml(tmp_path: Path) -> Path:
    make_image(tmp_path / "jsonl" / "img" / "wide.png", (900, 300))
    make_image(tmp_path / "jsonl" / "img" / "square.jpg", (64, 64))
    write(
        tmp_path / "jsonl" / "captions.jsonl",
        json.dumps({"image": "img/wide.png", "caption": "a wide red image"})
        + "\n"
        + json.dumps({"image_path": "img/square.jpg", "text": "a small square"})
        + "\n",
    )
    make_image(tmp_path / "folder" / "tall.png", (300, 700))
    write(tmp_path / "folder" / "tall.txt", "a tall red image\n")
    return write(
        tmp_path / "sftaux.yaml",
        """
datasets:
  - path: jsonl/captions.jsonl
    sample_weight: 3
  - name: folder
    path: folder
""",
    )


def test_sftaux_yaml_loads_jsonl_and_folder(tmp_path: Path) -> None:
    data = load_sftaux_data(sftaux_yaml(tmp_path))
    assert (data.resolution, data.empty_caption_prob) == (512, 0.1)
    captions, folder = data.datasets
    assert captions.name == "captions"
    assert [i.caption for i in captions.items] == ["a wide red image", "a small square"]
    assert captions.items[0].image_path == tmp_path / "jsonl" / "img" / "wide.png"
    assert [(i.image_path.name, i.caption) for i in folder.items] == [("tall.png", "a tall red image")]


@pytest.mark.parametrize(
    ("width", "height"), [(512, 512), (900, 300), (300, 700), (64, 64), (4000, 3000), (1024, 576), (2000, 100)]
)
def test_target_size_is_multiple_of_32_near_the_area_with_the_aspect_kept(width: int, height: int) -> None:
    w, h = target_size(width, height, 512)
    assert w % 32 == 0
    assert h % 32 == 0
    assert abs(w * h / 512**2 - 1) < 0.2
    # Rounding each side to 32 moves the aspect ratio by at most half a step of 32 on each side.
    assert abs(math.log((w / h) / (width / height))) < math.log((w + 16) / (w - 16)) + math.log((h + 16) / (h - 16))


def test_sftaux_loader_yields_sized_images_and_ten_percent_empty_captions(tmp_path: Path) -> None:
    data = load_sftaux_data(sftaux_yaml(tmp_path))
    loader = SftAuxLoader(data, seed=7)
    for image, caption in [next(loader) for _ in range(6)]:
        assert image.dtype == torch.float32
        assert image.shape[0] == 3
        assert image.shape[1] % 32 == 0
        assert image.shape[2] % 32 == 0
        assert abs(image.shape[1] * image.shape[2] / 512**2 - 1) < 0.2
        assert -1.0 <= image.min() <= image.max() <= 1.0
        assert caption in {"", "a wide red image", "a small square", "a tall red image"}
    # The empty-caption draws and dataset draws alone (no pixels), over many items.
    draws = [SftAuxLoader(data, seed=7)._draw(n) for n in range(4000)]
    assert sum(empty for _, _, empty in draws) / len(draws) == pytest.approx(0.1, abs=0.02)
    from_folder = sum(item.image_path.parent.name == "folder" for _, item, _ in draws) / len(draws)
    assert from_folder == pytest.approx(0.25, abs=0.03)  # weights 3 : 1


def test_sftaux_loader_batches_and_resumes(tmp_path: Path) -> None:
    data = load_sftaux_data(sftaux_yaml(tmp_path))
    loader = SftAuxLoader(data, seed=1, rank=0)
    images, captions = loader.next_batch(3)
    assert images.shape[0] == 3
    assert len(captions) == 3
    state = loader.state_dict()
    expected = [c for _, c in (next(loader) for _ in range(5))]
    resumed = SftAuxLoader(data, seed=1, rank=0)
    resumed.load_state_dict(state)
    assert [c for _, c in (next(resumed) for _ in range(5))] == expected
    with pytest.raises(ValueError, match="--seed"):
        SftAuxLoader(data, seed=2).load_state_dict(state)


def test_sftaux_errors(tmp_path: Path) -> None:
    path = sftaux_yaml(tmp_path)
    (tmp_path / "folder" / "tall.txt").unlink()
    with pytest.raises(DataConfigError, match=r"datasets\[1\]\.path: .*tall.png: no caption; write the caption"):
        load_sftaux_data(path)
    write(path, "datasets:\n  - path: jsonl/captions.jsonl\n    weight: 1\n")
    with pytest.raises(DataConfigError, match=r"datasets\[0\]\.weight: unknown key"):
        load_sftaux_data(path)
    (tmp_path / "jsonl" / "img" / "wide.png").unlink()
    write(path, "datasets:\n  - path: jsonl/captions.jsonl\n")
    with pytest.raises(DataConfigError, match=r"line 1: image .*wide.png not found; paths are relative to the .jsonl"):
        load_sftaux_data(path)
