"""The reward curve of a run as a PNG (drawn with PIL, no plotting library) and a one-line summary.

`plot_rewards(metrics.jsonl, reward.png)` draws ``reward/total`` and every ``reward/<name>/mean`` per
step, one coloured line each with a legend; `summarize` says how the total reward moved (mean of the
first and last few steps, and the t-statistic of its least-squares slope over the steps).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
WIDTH, HEIGHT, MARGIN = 800, 480, 60


def reward_series(metrics_path: Path) -> tuple[list[int], dict[str, list[float]]]:
    """Steps and, per curve (``total`` and each reward name), its value at every step (NaN where absent).

    A resumed run logs the steps after its checkpoint again; the last line of a step wins.
    """
    rows: dict[int, dict] = {}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "reward/total" in row:
            rows[row["step"]] = row
    steps = sorted(rows)
    names = sorted({k.split("/")[1] for row in rows.values() for k in row if re.fullmatch(r"reward/[^/]+/mean", k)})
    keys = {"total": "reward/total", **{name: f"reward/{name}/mean" for name in names}}
    series = {label: [_float(rows[s].get(key)) for s in steps] for label, key in keys.items()}
    return steps, series


@dataclass(frozen=True)
class Summary:
    steps: int
    first: float  # mean total reward of the first steps
    last: float  # ... of the last steps
    slope: float  # least-squares slope per step
    t: float  # slope / its standard error

    def line(self) -> str:
        return (
            f"{self.steps} steps: reward {self.first:.4f} -> {self.last:.4f} (first/last {_window(self.steps)} steps), "
            f"slope {self.slope:+.2e}/step, t = {self.t:.1f}"
        )


def summarize(values: list[float]) -> Summary:
    """How a per-step series moved: means of its first and last steps, least-squares slope and t."""
    points = [(x, y) for x, y in enumerate(values) if math.isfinite(y)]
    if len(points) < 3:
        raise ValueError(f"need at least 3 logged steps with a reward to summarize, got {len(points)}")
    n, w = len(points), _window(len(points))
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    residuals = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in points)
    se = math.sqrt(residuals / (n - 2) / sxx)
    t = slope / se if se > 0 else math.copysign(math.inf, slope) if slope else 0.0
    ys = [y for _, y in points]
    return Summary(n, sum(ys[:w]) / w, sum(ys[-w:]) / w, slope, t)


def plot_rewards(metrics_path: Path, png_path: Path, title: str = "reward per step") -> Summary:
    """Draw the run's reward curves into `png_path`; returns the summary of ``reward/total``."""
    steps, series = reward_series(metrics_path)
    summary = summarize(series["total"])
    values = [v for ys in series.values() for v in ys if math.isfinite(v)]
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    pad = 0.05 * (high - low)
    low, high = low - pad, high + pad
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    left, top, right, bottom = MARGIN, MARGIN // 2 + 10, WIDTH - MARGIN // 2, HEIGHT - MARGIN

    def to_xy(step: int, value: float) -> tuple[float, float]:
        span = max(steps[-1] - steps[0], 1)
        x = left + (step - steps[0]) / span * (right - left)
        return x, bottom - (value - low) / (high - low) * (bottom - top)

    draw.rectangle((left, top, right, bottom), outline="black")
    for i in range(5):  # y ticks
        value = low + i * (high - low) / 4
        y = to_xy(steps[0], value)[1]
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((4, y - 7), f"{value:.3f}", fill="black", font=font)
    for step in {steps[0], steps[len(steps) // 2], steps[-1]}:  # x ticks
        x = to_xy(step, low)[0]
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x - 8, bottom + 8), str(step), fill="black", font=font)
    draw.text((left, 6), f"{title}: {summary.line()}", fill="black", font=font)
    draw.text(((left + right) // 2 - 15, HEIGHT - 22), "step", fill="black", font=font)
    for i, (label, ys) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = [to_xy(s, y) for s, y in zip(steps, ys, strict=True) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3 if label == "total" else 2)
        draw.rectangle((right - 150, top + 10 + 18 * i, right - 138, top + 22 + 18 * i), fill=colour)
        draw.text((right - 132, top + 8 + 18 * i), label, fill="black", font=font)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(png_path, format="PNG")
    return summary


def _window(n: int) -> int:
    return max(1, min(5, n // 4))


def _float(value: float | None) -> float:
    return math.nan if value is None else float(value)
