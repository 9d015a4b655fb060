"""The judge prompt, built from the project's templates in the upstream format (TEMPLATES_DIR); parity with the
official construction on the real files when they are present."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from eval_unigenbench.benchmark import Benchmark, BenchmarkItem, load_benchmark
from eval_unigenbench.judge_prompt import (
    LANG_KEYS_FILE,
    NO_DEFINITION,
    Templates,
    build_judge_prompt,
    definition_gaps,
    explanations_file,
    template_file,
)
from tests.helpers import JUDGE_FIXTURES

TEMPLATES = JUDGE_FIXTURES / "templates"
DATA = JUDGE_FIXTURES / "unigenbench"


@pytest.fixture(scope="module")
def benchmarks() -> dict[str, Benchmark]:
    return {stem: load_benchmark(DATA / f"test_prompts_{stem}.csv") for stem in ("en", "zh")}


@pytest.fixture(scope="module")
def real_benchmarks(upstream_data: Path) -> dict[str, Benchmark]:
    data = upstream_data / "unigenbench"
    return {stem: load_benchmark(data / f"test_prompts_{stem}.csv") for stem in ("en", "en_long", "zh", "zh_long")}


def official_prompt(item: BenchmarkItem, templates: Templates) -> str:
    """Naive reference: the official evaluation script's build_system_prompt (str.format of the
    template, headers + 「 」 blocks, one "\\n<name>: <text>" line per testpoint)."""
    explanation = f"{templates.checkpoint_header}:\u300c"
    for point in item.testpoints:
        explanation += f"\n{point}: {templates.explanations[point]}"
    explanation += "\n\u300d"
    test_explanation = f"{templates.checkpoint_desc_header}:\u300c"
    for idx, point in enumerate(item.testpoints):
        test_explanation += f"\n{point}: {item.descriptions[idx]}"
    test_explanation += "\n\u300d"
    return templates.template.format(
        prompt=item.prompt, testpoint=item.testpoints, explanation=explanation, test_explanation=test_explanation
    )


@pytest.mark.parametrize("stem", ["en", "zh"])
def test_matches_the_official_construction_on_every_fixture_item(benchmarks: dict[str, Benchmark], stem: str):
    benchmark = benchmarks[stem]
    templates = Templates.load(TEMPLATES, benchmark.language)
    for item in benchmark.items:
        assert build_judge_prompt(item, templates) == official_prompt(item, templates)


def test_english_prompt_contains_everything_the_judge_needs(benchmarks: dict[str, Benchmark]):
    templates = Templates.load(TEMPLATES, "en")
    item = benchmarks["en"].by_id["0"]
    text = build_judge_prompt(item, templates)
    assert f"「{item.prompt}」" in text
    assert f"<prompt>{item.prompt}</prompt>" in text
    assert "['Style', 'Attribute - Quantity', 'Attribute - Color', 'Attribute - Material']" in text
    for testpoint, description in zip(item.testpoints, item.descriptions, strict=True):
        assert f"\n{testpoint}: {templates.explanations[testpoint]}\n" in text
        assert f"\n{testpoint}: {description}\n" in text
    assert "Checkpoint definitions:「\nStyle: The artistic or photographic style asked for\n" in text
    assert "Checkpoint descriptions:「\nStyle: watercolor painting\n" in text
    assert "{" not in text  # every placeholder filled


def test_chinese_prompt_contains_everything_the_judge_needs(benchmarks: dict[str, Benchmark]):
    templates = Templates.load(TEMPLATES, "zh")
    item = benchmarks["zh"].items[0]
    text = build_judge_prompt(item, templates)
    assert "这张图像的提示词为「水彩风格，木桌上放着三个红苹果。」" in text
    assert "['风格', '属性-数量', '属性-颜色']" in text
    assert "考点定义:「\n风格: 符合要求的艺术或摄影风格\n属性-数量: " in text
    assert "\n属性-颜色: 实体的颜色符合要求\n」" in text
    assert "考点要求:「\n风格: 水彩风格\n属性-数量: 三个苹果\n属性-颜色: 红苹果\n」" in text


def test_every_fixture_testpoint_has_a_definition(benchmarks: dict[str, Benchmark]):
    for benchmark in benchmarks.values():
        gaps = definition_gaps(benchmark.items, Templates.load(TEMPLATES, benchmark.language))
        assert gaps == {"primary": {}, "missing": {}}, benchmark.name


# Parity with the upstream files (JUDGE_DATA_DIR or ../shared/data; skipped without them).


@pytest.mark.parametrize("stem", ["en", "en_long", "zh", "zh_long"])
def test_matches_the_official_construction_on_every_real_item(
    upstream_data: Path, real_benchmarks: dict[str, Benchmark], stem: str
):
    benchmark = real_benchmarks[stem]
    templates = Templates.load(upstream_data / "templates", benchmark.language)
    for item in benchmark.items:
        assert build_judge_prompt(item, templates) == official_prompt(item, templates)
    if stem == "en":
        text = build_judge_prompt(benchmark.by_id["3"], templates)
        assert "Checkpoints Defination:「\nStyle: Art, painting, photography" in text
        assert "Checkpoints Description:「\nStyle: Ukiyo-e style\n" in text


def test_every_real_testpoint_has_a_definition(upstream_data: Path, real_benchmarks: dict[str, Benchmark]):
    for benchmark in real_benchmarks.values():
        gaps = definition_gaps(benchmark.items, Templates.load(upstream_data / "templates", benchmark.language))
        assert gaps == {"primary": {}, "missing": {}}, benchmark.name


def test_unknown_testpoints_fall_back_to_the_primary_dimension_or_say_so():
    templates = Templates(
        "en", "{prompt}|{testpoint}|{explanation}|{test_explanation}", {"Style": "Art styles"}, "Def", "Desc"
    )
    item = BenchmarkItem("0", "p", ["Style - Brushwork", "Mood", "Style"], ["ink", "calm", "oil"])
    text = build_judge_prompt(item, templates)
    assert "Def:「\nStyle - Brushwork: Art styles\nMood: (no definition)\nStyle: Art styles\n」" in text
    assert NO_DEFINITION == "(no definition)"
    assert definition_gaps([item], templates) == {"primary": {"Style - Brushwork": 1}, "missing": {"Mood": 1}}


def test_placeholders_in_the_prompt_are_not_expanded_again():
    templates = Templates("en", "A {prompt} B {testpoint} {explanation} {test_explanation} {other}", {}, "D", "E")
    item = BenchmarkItem("0", "draw {testpoint} and {x}", ["Mood"], ["calm"])
    text = build_judge_prompt(item, templates)
    assert text.startswith("A draw {testpoint} and {x} B ['Mood'] ")
    assert text.endswith(" {other}")  # unknown braces in the template stay


def copy_templates(tmp_path: Path) -> Path:
    for name in (template_file("en"), explanations_file("en"), LANG_KEYS_FILE):
        shutil.copy(TEMPLATES / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("name", [template_file("en"), explanations_file("en"), LANG_KEYS_FILE])
def test_missing_file_says_how_to_fix(tmp_path: Path, name: str):
    copy_templates(tmp_path)
    (tmp_path / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"{name} not found: set TEMPLATES_DIR"):
        Templates.load(tmp_path, "en")


def test_template_without_a_placeholder_is_rejected(tmp_path: Path):
    copy_templates(tmp_path)
    (tmp_path / template_file("en")).write_text("Judge {prompt} on {testpoint}.")
    with pytest.raises(ValueError, match=r"lacks the placeholder\(s\) \{explanation\}, \{test_explanation\}"):
        Templates.load(tmp_path, "en")


def test_bad_json_files_are_rejected(tmp_path: Path):
    copy_templates(tmp_path)
    (tmp_path / explanations_file("en")).write_text('{"Style": 3}')
    with pytest.raises(ValueError, match="must map testpoint names to definition strings"):
        Templates.load(tmp_path, "en")
    (tmp_path / explanations_file("en")).write_text("{oops")
    with pytest.raises(ValueError, match="is not valid JSON"):
        Templates.load(tmp_path, "en")
    shutil.copy(TEMPLATES / explanations_file("en"), tmp_path / explanations_file("en"))
    (tmp_path / LANG_KEYS_FILE).write_text(json.dumps({"zh": {}}))
    with pytest.raises(ValueError, match="must hold 'en'"):
        Templates.load(tmp_path, "en")


def test_unknown_language_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: en, zh"):
        Templates.load(TEMPLATES, "de")  # type: ignore[arg-type]
