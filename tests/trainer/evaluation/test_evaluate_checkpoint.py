"""The offline evaluation's pieces that need no judge: the trainer's eval metrics (the leaderboard's
Overall), the comparison table, the resume files and the pinned settings. The end-to-end run against
a real vLLM judge is tests/judges/test_evaluate_checkpoint.py."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from deepgen_common.eval_results import summarize_results
from deepgen_common.types import ImageResult
from deepgen_trainer.checkpoints.convert import convert
from deepgen_trainer.checkpoints.run_checkpoint import save_checkpoint
from deepgen_trainer.config import ConfigError, TrainConfig
from deepgen_trainer.evaluation.evaluate import eval_items, summary_metrics
from deepgen_trainer.evaluation.evaluate_checkpoint import (
    Source,
    _append_lines,
    default_output_dir,
    find_source,
    format_table,
    load_model,
    pin_settings,
    read_verdicts,
    report,
)
from deepgen_trainer.model.tiny import build_tiny

COLOR, QUANTITY, STYLE = "Attribute - Color", "Attribute - Quantity", "Style"
# Attribute pools 4 testpoints (3 correct), Style 2 (0 correct): pooled 3/6 = 0.5, but the
# leaderboard's Overall is the mean of the primary dimensions, (0.75 + 0.0) / 2 = 0.375.
RESULTS = [
    ImageResult("0", 0, "p0", [COLOR, QUANTITY, STYLE], [1, 1, 0], None, "ok"),
    ImageResult("1", 0, "p1", [COLOR, COLOR, STYLE], [1, 0, 0], None, "ok"),
    ImageResult("2", 0, "p2", [STYLE], None, None, "parse_failure", "malformed"),
]


def test_logged_overall_is_the_mean_of_the_primary_dimensions():
    summary = summarize_results("r", 10, RESULTS, answer_rules="official", benchmark="en")
    metrics = summary_metrics(summary, "en")
    assert metrics["eval/en/overall"] == pytest.approx(0.375)
    mean = sum(d.accuracy for d in summary.primary_dimensions) / len(summary.primary_dimensions)
    assert metrics["eval/en/overall"] == pytest.approx(mean)
    assert metrics["eval/en/pooled"] == pytest.approx(0.5)
    assert metrics["eval/en/primary/Attribute"] == pytest.approx(0.75)
    assert (metrics["eval/en/images_judged"], metrics["eval/en/parse_failures"]) == (2.0, 1.0)
    # The original's names next to ours: overall_accuracy is the pooled accuracy; success_rate the
    # images whose answer parsed (2 of 3); one key per sub-dimension, "Primary.Primary-Sub".
    assert metrics["eval/en/overall_accuracy"] == metrics["eval/en/pooled"]
    assert metrics["eval/en/success_rate"] == pytest.approx(2 / 3)
    assert metrics["eval/en/Attribute.Attribute-Color"] == pytest.approx(2 / 3)  # 1 + 1 of 3 color testpoints
    assert metrics["eval/en/Attribute.Attribute-Quantity"] == pytest.approx(1.0)
    assert metrics["eval/en/Style"] == pytest.approx(0.0)
    nothing = summarize_results("r", 10, RESULTS[2:], answer_rules="official")
    assert "eval/zh/overall" not in summary_metrics(nothing, "zh")  # NaN: nothing judged, not 0


def test_eval_items_seeds_match_the_training_evaluation():
    items = eval_items([("7", "a"), ("9", "b")], 2)
    assert [(i.index, i.prompt_id, i.duplicate, i.seed) for i in items] == [
        (0, "7", 0, 42), (0, "7", 1, 43), (1, "9", 0, 1042), (1, "9", 1, 1043)
    ]  # fmt: skip


def test_table_puts_the_baseline_beside_each_primary_dimension():
    summary = summarize_results("r", 10, RESULTS, answer_rules="official", benchmark="en")
    baseline = summarize_results("b", 0, [dataclasses.replace(RESULTS[0], scores=[1, 1, 1])], answer_rules="official")
    table = format_table("en", summary, baseline).splitlines()
    assert table[0] == "UniGenBench en: 2 images judged, 1 parse failures, 0 errors (official answer rules)"
    assert table[1].split() == ["dimension", "checkpoint", "baseline", "delta"]
    assert table[2].split() == ["Attribute", "75.00", "100.00", "-25.00"]
    assert table[3].split() == ["Style", "0.00", "100.00", "-100.00"]
    assert table[4].split()[-3:] == ["37.50", "100.00", "-62.50"]  # Overall (mean of primary)
    assert table[5].split()[-3:] == ["50.00", "100.00", "-50.00"]  # Pooled
    alone = format_table("en", summary, None).splitlines()
    assert alone[1].split() == ["dimension", "checkpoint"]


def test_verdicts_file_skips_a_torn_last_line(tmp_path: Path):
    path = tmp_path / "verdicts.jsonl"
    lines = [json.dumps({"answer_rules": "official", **dataclasses.asdict(r)}) for r in RESULTS[:2]]
    path.write_text("\n".join(lines) + '\n{"answer_rules": "offi', encoding="utf-8")
    verdicts = read_verdicts(path)
    assert verdicts == {("0", 0): (RESULTS[0], "official"), ("1", 0): (RESULTS[1], "official")}
    assert read_verdicts(tmp_path / "absent.jsonl") == {}
    # The next run appends after the torn line, not onto it.
    _append_lines(path, [json.dumps({"answer_rules": "official", **dataclasses.asdict(RESULTS[2])})])
    assert read_verdicts(path)[("2", 0)] == (RESULTS[2], "official")


def test_a_resume_with_other_generation_settings_is_refused(tmp_path: Path):
    source = Source("pth", tmp_path / "model.pth", 0, TrainConfig(model="tiny", image_height=64, image_width=64))
    pin_settings(tmp_path / "eval", source)
    pin_settings(tmp_path / "eval", source)  # the same settings: resume
    other = dataclasses.replace(source, config=dataclasses.replace(source.config, num_inference_steps=8))
    with pytest.raises(ConfigError, match="other settings \\(num_inference_steps"):
        pin_settings(tmp_path / "eval", other)
    assert not math.isnan(json.loads((tmp_path / "eval" / "eval_config.json").read_text())["eval_cfg_scale"])


def _trained_dit(seed: int) -> dict[str, torch.Tensor]:
    dit = build_tiny(seed=seed).transformer.state_dict()
    return {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in dit.items()}


def test_a_checkpoint_and_its_converted_pth_load_the_same_trained_dit(tmp_path: Path):
    trained = _trained_dit(seed=3)
    cfg = TrainConfig(model="tiny", seed=3, image_height=64, image_width=64, num_inference_steps=3)
    deepgen_only = build_tiny(seed=3).deepgen_only_state()
    save_checkpoint(tmp_path / "run", 5, trainable=trained, deepgen_only=deepgen_only, config=cfg.to_dict())
    rl = find_source(str(tmp_path / "run"), {"eval_cfg_scale": 2.0})
    assert (rl.kind, rl.step, rl.config.image_height, rl.config.eval_cfg_scale) == ("rl", 5, 64, 2.0)
    assert default_output_dir(rl) == tmp_path / "run" / "eval" / "checkpoint-5"
    convert(tmp_path / "run", tmp_path / "run5.pth")  # make convert: every key family of the SFT model
    pth = find_source(str(tmp_path / "run5.pth"), {"model": "tiny", "seed": 3})
    assert (pth.kind, pth.step, pth.config.image_height) == ("pth", 0, 512)  # the trainer's defaults
    assert default_output_dir(pth) == tmp_path / "run5-eval"
    for source in (rl, pth):
        loaded = load_model(source).transformer.state_dict()
        torch.testing.assert_close(loaded, trained)
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        find_source(str(tmp_path), {})


def test_report_logs_metrics_and_contact_sheets_to_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "en").mkdir()
    Image.new("RGB", (30, 20), "green").save(tmp_path / "en" / "contact_sheet.png")
    source = Source("pth", tmp_path / "model.pth", 0, TrainConfig(model="tiny"))
    summary = summarize_results("r", 0, RESULTS, answer_rules="official", benchmark="en")
    report("none", tmp_path, source, {"en": summary})
    assert not (tmp_path / "wandb").exists()
    report("wandb", tmp_path, source, {"en": summary})
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    [sheet] = run_dir.rglob("media/images/eval/en/contact_sheet_*.png")
    assert Image.open(sheet).size == (30, 20)
