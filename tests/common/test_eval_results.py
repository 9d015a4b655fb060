"""Run summaries (hand-computed) and the atomic CSV / JSON writers."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest

from deepgen.eval.v1 import eval_pb2
from deepgen_common.eval_results import (
    RESULT_COLUMNS,
    DimensionScore,
    ImageResult,
    JudgedImage,
    RunSummary,
    summarize,
    summarize_results,
    write_results_csv,
    write_summary_json,
)

COLOR, QUANTITY, STYLE, KNOWLEDGE = "Attribute - Color", "Attribute - Quantity", "Style", "World Knowledge"

RESULTS = [
    ImageResult("0", 0, "two red pandas, ink", [STYLE, COLOR, QUANTITY], [1, 0, 1], '["ink", "grey", "two"]', "ok"),
    ImageResult("0", 1, "two red pandas, ink", [STYLE, COLOR, QUANTITY], [1, 1, 0], '["ink", "red", "one"]', "ok"),
    ImageResult("1", 0, "a red Eiffel tower", [KNOWLEDGE, COLOR], [0, 1], None, "ok"),
    ImageResult(
        "1", 1, "a red Eiffel tower", [KNOWLEDGE, COLOR], None, None, "parse_failure", "wrong_length: 3 scores"
    ),
    ImageResult("2", 0, "说「你好」的鹦鹉", ["文本生成"], None, None, "error", "judge unreachable"),
]

# Hand computation over the three "ok" images (the parse failure and the error are excluded; counting
# them as zeros would give e.g. overall 5/11 instead of 5/8):
#   Attribute - Color:    image 0/0 -> 0, 0/1 -> 1, 1/0 -> 1   = 2/3
#   Attribute - Quantity: 0/0 -> 1, 0/1 -> 0                   = 1/2
#   Style:                0/0 -> 1, 0/1 -> 1                   = 2/2
#   World Knowledge:      1/0 -> 0                             = 0/1
#   primary Attribute = (2 + 1) / (3 + 2) = 3/5 = 0.6; Style = 1.0; World Knowledge = 0.0
#   overall (micro) = (2 + 1 + 2 + 0) / (3 + 2 + 2 + 1) = 5/8 = 0.625
#   primary mean = (0.6 + 1.0 + 0.0) / 3 = 0.5333...
EXPECTED = RunSummary(
    run_id="run-7",
    step=30,
    images_judged=3,
    parse_failures=1,
    errors=1,
    sub_dimensions=[
        DimensionScore(COLOR, 2, 3, 2 / 3),
        DimensionScore(QUANTITY, 1, 2, 0.5),
        DimensionScore(STYLE, 2, 2, 1.0),
        DimensionScore(KNOWLEDGE, 0, 1, 0.0),
    ],
    primary_dimensions=[
        DimensionScore("Attribute", 3, 5, 0.6),
        DimensionScore(STYLE, 2, 2, 1.0),
        DimensionScore(KNOWLEDGE, 0, 1, 0.0),
    ],
    overall_accuracy=0.625,
    primary_mean_accuracy=1.6 / 3,
)


def test_hand_computed_summary():
    judged = [JudgedImage(r.prompt_id, r.duplicate, r.testpoints, r.scores) for r in RESULTS if r.scores is not None]
    summary = summarize("run-7", 30, judged, parse_failures=1, errors=1)
    assert summary == EXPECTED
    assert summarize_results("run-7", 30, RESULTS, answer_rules="official", benchmark="en") == replace(
        EXPECTED, answer_rules="official", benchmark="en", images=RESULTS
    )


def test_chinese_primary_dimensions_split_on_the_bare_hyphen():
    judged = [JudgedImage("0", 0, ["属性-颜色", "属性-数量", "风格"], [1, 0, 1])]
    summary = summarize("r", 0, judged)
    assert summary.primary_dimensions == [DimensionScore("属性", 1, 2, 0.5), DimensionScore("风格", 1, 1, 1.0)]
    assert summary.primary_mean_accuracy == 0.75


def test_no_judged_image_gives_nan_not_zero():
    summary = summarize("r", 0, [], parse_failures=2, errors=1)
    assert (summary.images_judged, summary.parse_failures, summary.errors) == (0, 2, 1)
    assert summary.sub_dimensions == summary.primary_dimensions == []
    assert math.isnan(summary.overall_accuracy)
    assert math.isnan(summary.primary_mean_accuracy)
    assert summary.to_dict()["overall_accuracy"] is None


def test_inconsistent_inputs_are_rejected():
    with pytest.raises(ValueError, match="2 testpoints but 1 scores"):
        JudgedImage("0", 0, [STYLE, COLOR], [1])
    with pytest.raises(ValueError, match="scores must be 0/1"):
        JudgedImage("0", 0, [STYLE], [2])
    with pytest.raises(ValueError, match="counts must be >= 0"):
        summarize("r", 0, [], parse_failures=-1)
    with pytest.raises(ValueError, match="status ok without scores"):
        summarize_results("r", 0, [ImageResult("0", 0, "p", [STYLE], None, None, "ok")])
    with pytest.raises(ValueError, match="unknown status 'skipped'; valid: ok, parse_failure, error"):
        summarize_results("r", 0, [ImageResult("0", 0, "p", [STYLE], None, None, "skipped")])  # type: ignore[arg-type]


def test_results_csv_round_trip(tmp_path: Path):
    path = tmp_path / "step_30" / "results.csv"  # the folder is created
    write_results_csv(path, RESULTS)
    with path.open(encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file))
    assert tuple(rows[0]) == RESULT_COLUMNS
    read = [
        ImageResult(
            prompt_id=row["prompt_id"],
            duplicate=int(row["duplicate"]),
            prompt=row["prompt"],
            testpoints=json.loads(row["testpoints"]),
            scores=json.loads(row["scores"]) if row["scores"] else None,
            analysis=row["analysis"] or None,
            status=row["status"],  # type: ignore[arg-type]
            detail=row["detail"],
        )
        for row in rows
    ]
    assert read == RESULTS
    assert "文本生成" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["results.csv"]  # no temporary file left


def test_summary_json_round_trip(tmp_path: Path):
    path = tmp_path / "summary.json"
    write_summary_json(path, EXPECTED)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["overall_accuracy"] == 0.625
    assert data["primary_dimensions"][0] == {"name": "Attribute", "correct": 3, "total": 5, "accuracy": 0.6}
    restored = RunSummary(
        **{
            **data,
            "sub_dimensions": [DimensionScore(**d) for d in data["sub_dimensions"]],
            "primary_dimensions": [DimensionScore(**d) for d in data["primary_dimensions"]],
        }
    )
    assert restored == EXPECTED


def test_a_failed_write_keeps_the_old_file(tmp_path: Path):
    path = tmp_path / "results.csv"
    write_results_csv(path, RESULTS[:1])
    before = path.read_text(encoding="utf-8")

    def broken_rows():
        yield RESULTS[0]
        raise RuntimeError("judge crashed mid-run")

    with pytest.raises(RuntimeError, match="mid-run"):
        write_results_csv(path, broken_rows())
    assert path.read_text(encoding="utf-8") == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_summary_fields_mirror_the_proto():
    assert [f.name for f in eval_pb2.RunSummary.DESCRIPTOR.fields] == list(RunSummary.__dataclass_fields__)
    assert [f.name for f in eval_pb2.DimensionScore.DESCRIPTOR.fields] == list(DimensionScore.__dataclass_fields__)
    assert [f.name for f in eval_pb2.ImageVerdict.DESCRIPTOR.fields] == [
        "prompt_id", "duplicate", "prompt", "testpoints", "status", "scores", "analysis", "detail"
    ]  # fmt: skip
    assert set(ImageResult.__dataclass_fields__) == {f.name for f in eval_pb2.ImageVerdict.DESCRIPTOR.fields}


def test_summary_json_records_the_rules_and_leaves_the_images_to_the_csv(tmp_path: Path):
    summary = summarize_results("run-7", 30, RESULTS, answer_rules="tolerant", benchmark="zh")
    write_summary_json(tmp_path / "summary.json", summary)
    data = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert (data["answer_rules"], data["benchmark"]) == ("tolerant", "zh")
    assert "images" not in data
    assert summary.to_dict()["images"][3]["status"] == "parse_failure"
