"""Benchmark CSVs: the four real UniGenBench files, the upstream column names, and every validation error."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from deepgen_common.eval_results import primary_dimension
from eval_unigenbench.benchmark import BenchmarkError, load_benchmark
from tests.helpers import SHARED_DATA

DATA = SHARED_DATA / "unigenbench"
EN_SUB_DIMS = {"Testpoints": ["Style", "Attribute - Color"], "Testpoint Description": ["watercolor", "red"]}
ZH_SUB_DIMS = {"考点": ["风格", "属性-颜色"], "考点对应描述": ["水彩", "红色"]}


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows([[json.dumps(v, ensure_ascii=False) if isinstance(v, dict) else v for v in r] for r in rows])
    return path


@pytest.mark.parametrize(
    ("stem", "language", "testpoints_total"),
    [("en", "en", 1813), ("en_long", "en", 3920), ("zh", "zh", 1813), ("zh_long", "zh", 3920)],
)
def test_loads_the_real_benchmarks(stem: str, language: str, testpoints_total: int):
    benchmark = load_benchmark(DATA / f"test_prompts_{stem}.csv")
    assert benchmark.name == f"unigenbench-{stem.replace('_', '-')}"
    assert benchmark.language == language  # detected from the sub_dims keys
    assert len(benchmark.items) == 600
    assert [item.prompt_id for item in benchmark.items] == [str(i) for i in range(600)]
    assert sum(len(item.testpoints) for item in benchmark.items) == testpoints_total
    assert all(len(item.testpoints) == len(item.descriptions) for item in benchmark.items)
    assert benchmark.by_id["42"] is benchmark.items[42]


def test_known_english_row():
    item = load_benchmark(DATA / "test_prompts_en.csv").items[0]
    assert item.prompt_id == "0"
    assert item.prompt.startswith("In the style of classical ink painting, against the background of Egyptian pyramids")
    assert item.testpoints == ["Style", "World Knowledge", "Attribute - Quantity"]
    assert item.descriptions == ["classical ink painting", "Egyptian pyramids", "two pandas"]
    assert item.meta == {
        "Primary Categories": "Creative Divergence",
        "Secondary Categories": "Imaginative Thinking",
        "Subjects": "Animal",
        "Sentence Structure": "Descriptive",
    }


def test_known_chinese_row():
    benchmark = load_benchmark(DATA / "test_prompts_zh.csv", language="zh")
    item = benchmark.items[0]
    assert item.prompt == "古典水墨画风格，埃及金字塔的背景下，两只穿着宇航服的熊猫正在悠闲地品尝竹子。"
    assert item.testpoints == ["风格", "世界知识", "属性-数量"]  # from the key 考点
    assert item.descriptions == ["古典水墨画风格", "埃及金字塔", "两只熊猫"]  # from the key 考点对应描述
    assert item.meta["一级垂类"] == "创意发散"
    assert benchmark.repairs == []


def test_the_upstream_missing_comma_is_repaired_and_reported():
    # test_prompts_en_long.csv index 509 has `"Grammar - Negation" "Attribute - Color"` (no comma):
    # 4 names for 5 descriptions once Python-style concatenated, 5 and 5 with the comma restored.
    benchmark = load_benchmark(DATA / "test_prompts_en_long.csv")
    item = benchmark.by_id["509"]
    assert item.testpoints[1:3] == ["Grammar - Negation", "Attribute - Color"]
    assert len(item.testpoints) == len(item.descriptions) == 5
    assert len(benchmark.repairs) == 1
    assert "index '509'" in benchmark.repairs[0]


def test_duplicate_testpoint_names_within_an_item_are_kept():
    # Two real items list a testpoint twice, with different descriptions; each is judged separately.
    item = load_benchmark(DATA / "test_prompts_en_long.csv").by_id["440"]
    assert item.testpoints.count("Attribute - Color") == 2


def test_upstream_column_names(tmp_path: Path):
    path = write_csv(tmp_path / "upstream.csv", ["index", "prompt_en", "sub_dims_en"], [[7, "a red fox", EN_SUB_DIMS]])
    benchmark = load_benchmark(path)
    assert (benchmark.name, benchmark.language) == ("unigenbench-upstream", "en")
    assert benchmark.items[0].prompt_id == "7"
    assert benchmark.items[0].testpoints == ["Style", "Attribute - Color"]


def test_a_file_with_both_languages_needs_the_language(tmp_path: Path):
    header = ["index", "prompt_en", "sub_dims_en", "prompt_zh", "sub_dims_zh"]
    path = write_csv(tmp_path / "both.csv", header, [[0, "a red fox", EN_SUB_DIMS, "一只红狐狸", ZH_SUB_DIMS]])
    with pytest.raises(BenchmarkError, match="both English and Chinese columns; pass language="):
        load_benchmark(path)
    assert load_benchmark(path, language="zh").items[0].prompt == "一只红狐狸"
    assert load_benchmark(path, language="en").items[0].prompt == "a red fox"


def test_unknown_language_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown language 'fr'; valid: en, zh"):
        load_benchmark(DATA / "test_prompts_en.csv", language="fr")  # type: ignore[arg-type]


def test_missing_file_names_the_setting(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="UNIGENBENCH_DATA_DIR"):
        load_benchmark(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    ("header", "rows", "language", "message"),
    [
        (["index", "prompt"], [[0, "x"]], None, "missing column 'sub_dims'"),
        (["id", "prompt", "sub_dims"], [[0, "x", EN_SUB_DIMS]], None, "missing column 'index'"),
        (["index", "text", "dims"], [[0, "x", EN_SUB_DIMS]], None, "missing the prompt and sub_dims columns"),
        (["index", "prompt", "sub_dims"], [], None, "no rows after the header"),
        (
            ["index", "prompt", "sub_dims"],
            [[0, "x", '{"Testpoints": [}']],
            None,
            r"line 2 \(index '0'\).*not valid JSON",
        ),
        (["index", "prompt", "sub_dims"], [[0, "x", "[1, 2]"]], None, "must be a JSON object"),
        (["index", "prompt", "sub_dims"], [[0, "x", ""]], None, "empty 'sub_dims'"),
        (["index", "prompt", "sub_dims"], [[0, "  ", EN_SUB_DIMS]], None, "empty 'prompt'"),
        (["index", "prompt", "sub_dims"], [["", "x", EN_SUB_DIMS]], None, "empty 'index'"),
        (
            ["index", "prompt", "sub_dims"],
            [[0, "x", EN_SUB_DIMS], [1, "y", EN_SUB_DIMS], [0, "z", EN_SUB_DIMS]],
            None,
            r"line 4 \(index '0'\): duplicate index '0' \(first on line 2\)",
        ),
        (
            ["index", "prompt", "sub_dims"],
            [[3, "x", {"Testpoints": ["Style", "World Knowledge"], "Testpoint Description": ["oil"]}]],
            None,
            r"index '3'\): 2 testpoints but 1 descriptions",
        ),
        (["index", "prompt", "sub_dims"], [[0, "x", {"Subjects": "Animal"}]], None, "no testpoint key"),
        (
            ["index", "prompt", "sub_dims"],
            [[0, "x", {"Testpoints": ["Style"]}]],
            None,
            "lacks the en key 'Testpoint Description'",
        ),
        (["index", "prompt", "sub_dims"], [[0, "x", ZH_SUB_DIMS]], "en", "it has the zh keys: pass language='zh'"),
        (
            ["index", "prompt", "sub_dims"],
            [[0, "x", EN_SUB_DIMS], [1, "y", ZH_SUB_DIMS]],
            None,
            r"line 3 \(index '1'\): sub_dims lacks the en key 'Testpoints'",
        ),
        (
            ["index", "prompt", "sub_dims"],
            [[0, "x", {"Testpoints": [], "Testpoint Description": []}]],
            None,
            "'Testpoints' is empty",
        ),
        (
            ["index", "prompt", "sub_dims"],
            [[0, "x", {"Testpoints": "Style", "Testpoint Description": ["oil"]}]],
            None,
            "must be a list of strings",
        ),
        (
            ["index", "prompt_zh", "sub_dims_zh"],
            [[0, "x", ZH_SUB_DIMS]],
            "en",
            "language='en' but the file has only zh",
        ),
    ],
)
def test_bad_files_name_file_row_and_problem(
    tmp_path: Path, header: list[str], rows: list[list[object]], language: str | None, message: str
):
    path = write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(BenchmarkError, match=message) as error:
        load_benchmark(path, language=language)  # type: ignore[arg-type]
    assert str(path) in str(error.value)


def test_empty_file(tmp_path: Path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(BenchmarkError, match="empty file"):
        load_benchmark(path)


def test_unrepairable_json_is_not_guessed(tmp_path: Path):
    # Missing commas are repaired only between strings; a missing comma before a number is an error.
    path = write_csv(tmp_path / "bad.csv", ["index", "prompt", "sub_dims"], [[0, "x", '{"a": 1 "b": [1 2]}']])
    with pytest.raises(BenchmarkError, match="not valid JSON"):
        load_benchmark(path)


@pytest.mark.parametrize(
    ("name", "primary"),
    [
        ("Attribute - Color", "Attribute"),
        ("Entity Layout - Two-Dimensional Space", "Entity Layout"),
        ("Action - Non-contact Interaction", "Action"),
        ("World Knowledge", "World Knowledge"),
        ("属性-颜色", "属性"),
        ("动作-人物/拟人全身动作", "动作"),
        ("风格", "风格"),
    ],
)
def test_primary_dimension(name: str, primary: str):
    assert primary_dimension(name) == primary
