"""UniGenBench accuracies of an evaluation run, and its per-image CSV and summary JSON files.

Shared by eval-unigenbench (which summarises each run) and the trainer's offline evaluation (which
summarises the verdicts of several runs, after a resume).

Definitions (testpoint = one (name, score) pair of a judged image; names such as "Attribute - Color"
are the sub-dimensions):
- sub-dimension accuracy = correct / total over the testpoints with that name;
- primary dimension = `primary_dimension(name)` ("Attribute"); its accuracy pools its testpoints;
- overall accuracy = Σcorrect / Σtotal over every testpoint (micro average);
- primary mean accuracy = the unweighted mean of the primary-dimension accuracies: the leaderboard's
  Overall score.
Images whose answer could not be parsed, and images whose judging failed, are counted separately and
contribute nothing to the accuracies (never zeros). With no judged image the accuracies are NaN (in
the JSON: null), not 0.0.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from deepgen_common.types import DimensionScore, ImageResult, RunSummary

RESULT_COLUMNS = ("prompt_id", "duplicate", "prompt", "testpoints", "scores", "analysis", "status", "detail")


def primary_dimension(testpoint: str) -> str:
    """The primary dimension of a sub-dimension name: the part before the first " - ", trimmed
    ("Attribute - Color" -> "Attribute"). Chinese names join the parts with a bare hyphen
    ("属性-颜色" -> "属性"), so without " - " the first "-" splits. A name without a hyphen
    ("Style", "世界知识") is its own primary dimension."""
    for separator in (" - ", "-"):
        if separator in testpoint:
            return testpoint.split(separator, 1)[0].strip()
    return testpoint.strip()


@dataclass(frozen=True)
class JudgedImage:
    """One image with a parsed answer: `scores[i]` in {0, 1} for `testpoints[i]`."""

    prompt_id: str
    duplicate: int
    testpoints: list[str]
    scores: list[int]

    def __post_init__(self) -> None:
        if len(self.testpoints) != len(self.scores):
            raise ValueError(
                f"prompt {self.prompt_id!r} duplicate {self.duplicate}: "
                f"{len(self.testpoints)} testpoints but {len(self.scores)} scores"
            )
        if any(score not in (0, 1) for score in self.scores):
            raise ValueError(f"prompt {self.prompt_id!r} duplicate {self.duplicate}: scores must be 0/1: {self.scores}")


def summarize(
    run_id: str, step: int, judged: Iterable[JudgedImage], parse_failures: int = 0, errors: int = 0
) -> RunSummary:
    """Accuracies over `judged`; the failure counts are only reported (see the module docstring)."""
    if parse_failures < 0 or errors < 0:
        raise ValueError(f"counts must be >= 0, got parse_failures={parse_failures}, errors={errors}")
    sub: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # name -> [correct, total]
    primary: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    images = 0
    for image in judged:
        images += 1
        for name, score in zip(image.testpoints, image.scores, strict=True):
            for counts in (sub[name], primary[primary_dimension(name)]):
                counts[0] += score
                counts[1] += 1
    sub_scores = _dimension_scores(sub)
    primary_scores = _dimension_scores(primary)
    correct = sum(c for c, _ in sub.values())
    total = sum(t for _, t in sub.values())
    return RunSummary(
        run_id=run_id,
        step=step,
        images_judged=images,
        parse_failures=parse_failures,
        errors=errors,
        sub_dimensions=sub_scores,
        primary_dimensions=primary_scores,
        overall_accuracy=correct / total if total else math.nan,
        primary_mean_accuracy=(
            sum(d.accuracy for d in primary_scores) / len(primary_scores) if primary_scores else math.nan
        ),
    )


def summarize_results(
    run_id: str, step: int, results: Iterable[ImageResult], *, answer_rules: str = "", benchmark: str = ""
) -> RunSummary:
    """`summarize` over per-image results, counting the non-"ok" ones by status; the summary keeps the
    results (`images`), the answer rules they were read with and the benchmark set."""
    results = list(results)
    judged: list[JudgedImage] = []
    counts = {"parse_failure": 0, "error": 0}
    for result in results:
        if result.status == "ok":
            if result.scores is None:
                raise ValueError(f"prompt {result.prompt_id!r} duplicate {result.duplicate}: status ok without scores")
            judged.append(JudgedImage(result.prompt_id, result.duplicate, result.testpoints, result.scores))
        elif result.status in counts:
            counts[result.status] += 1
        else:
            raise ValueError(f"unknown status {result.status!r}; valid: ok, {', '.join(counts)}")
    summary = summarize(run_id, step, judged, counts["parse_failure"], counts["error"])
    return replace(summary, answer_rules=answer_rules, benchmark=benchmark, images=results)


def write_results_csv(path: Path | str, rows: Iterable[ImageResult]) -> None:
    """Write the per-image CSV atomically (columns RESULT_COLUMNS). Lists are JSON arrays
    (`["Style", "Attribute - Color"]`, `[1, 0]`); a missing scores / analysis is an empty cell."""

    def write(file: IO[str]) -> None:
        writer = csv.writer(file)
        writer.writerow(RESULT_COLUMNS)
        for row in rows:
            writer.writerow(
                [
                    row.prompt_id,
                    row.duplicate,
                    row.prompt,
                    json.dumps(row.testpoints, ensure_ascii=False),
                    "" if row.scores is None else json.dumps(row.scores),
                    row.analysis or "",
                    row.status,
                    row.detail,
                ]
            )

    _atomic_write(Path(path), write, newline="")


def write_summary_json(path: Path | str, summary: RunSummary) -> None:
    """Write `summary.to_dict(images=False)` as JSON atomically (UTF-8, indented; strictly valid JSON, no
    NaN); the per-image verdicts belong in the results CSV."""
    text = json.dumps(summary.to_dict(images=False), ensure_ascii=False, indent=2, allow_nan=False) + "\n"
    _atomic_write(Path(path), lambda file: file.write(text))


def read_summary_json(path: Path | str) -> RunSummary:
    """A summary written by `write_summary_json` (without its per-image verdicts); null accuracies are NaN."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    for key in ("overall_accuracy", "primary_mean_accuracy"):
        if data[key] is None:
            data[key] = math.nan
    for key in ("sub_dimensions", "primary_dimensions"):
        data[key] = [DimensionScore(**d) for d in data[key]]
    return RunSummary(**data)


def _dimension_scores(counts: dict[str, list[int]]) -> list[DimensionScore]:
    return [DimensionScore(name, c, t, c / t) for name, (c, t) in sorted(counts.items())]


def _atomic_write(path: Path, write: Callable[[IO[str]], object], newline: str | None = None) -> None:
    """Write through a temporary file in the same folder, then rename it over `path`, so a reader (or
    a crash mid-write) never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "w", encoding="utf-8", newline=newline) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o644)  # mkstemp creates 0600; outputs are meant to be read by others
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
