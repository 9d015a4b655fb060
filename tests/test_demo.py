"""`make demo` / `make demo-learn`: the reward plot (a valid PNG) and the closing one-line summary."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from deepgen_trainer.observe.reward_plot import plot_rewards, reward_series, summarize
from tests.helpers import REPO


def write_metrics(path: Path, totals: list[float]) -> Path:
    lines = []
    for step, total in enumerate(totals, start=1):
        row = {"step": step, "reward/total": total, "reward/ocr/mean": total / 2, "reward/clip_sim/mean": None}
        lines.append(json.dumps(row))
    lines.append(json.dumps({"step": 0, "eval/overall_accuracy": 0.5}))  # an eval-only line has no reward
    path.write_text("\n".join(lines) + "\n")
    return path


def test_summary_by_hand() -> None:
    # y = [0, 1, 3] (see test_learning's slope test): slope 1.5, t = 1.5·√12; first/last window 1 step.
    summary = summarize([0.0, 1.0, 3.0])
    assert (summary.steps, summary.first, summary.last) == (3, 0.0, 3.0)
    assert summary.slope == pytest.approx(1.5)
    assert summary.t == pytest.approx(1.5 * math.sqrt(12))
    with pytest.raises(ValueError, match="at least 3 logged steps"):
        summarize([1.0, math.nan])


def test_plot_is_a_valid_png_with_one_curve_per_reward(tmp_path: Path) -> None:
    metrics = write_metrics(tmp_path / "metrics.jsonl", [0.1 * i for i in range(10)])
    steps, series = reward_series(metrics)
    assert steps == list(range(1, 11))
    assert set(series) == {"total", "ocr", "clip_sim"}
    assert all(math.isnan(v) for v in series["clip_sim"])  # never scored: no line, no crash
    png = tmp_path / "plot" / "reward.png"
    summary = plot_rewards(metrics, png)
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert (image.format, image.size) == ("PNG", (800, 480))
        colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=100_000)}
    assert (31, 119, 180) in colours  # the total's line is drawn
    assert summary.slope == pytest.approx(0.1)


@pytest.mark.integration
def test_make_demo_learn_ends_with_a_summary_and_writes_the_plot(tmp_path: Path) -> None:
    env = {**os.environ, "DEMO_STEPS": "6", "DEMO_OUTPUT_DIR": str(tmp_path / "demo-learn")}
    done = subprocess.run(
        ["make", "-s", "demo-learn"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"demo-learn: 6 steps: reward [0-9.]+ -> [0-9.]+ \(first/last 1 steps\), slope [-+][0-9.e+-]+/step, "
        r"t = -?[0-9.]+(inf)?; plot .*reward\.png",
        last,
    ), last
    with Image.open(tmp_path / "demo-learn" / "reward.png") as image:
        image.verify()
