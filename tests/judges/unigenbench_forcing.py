"""UniGenBench answers forced per prompt, the accuracies they imply, and an eval-unigenbench service
in front of a judge URL: shared by the eval service's tests and the trainer's evaluation test."""

from __future__ import annotations

import re
import zlib
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from deepgen_common.eval_results import primary_dimension
from eval_unigenbench.api import eval_component
from eval_unigenbench.benchmark import BenchmarkItem, load_benchmark
from eval_unigenbench.settings import EvalSettings
from tests.helpers import SHARED_DATA, ServiceThread

BENCHMARKS = SHARED_DATA / "unigenbench"
EN = load_benchmark(BENCHMARKS / "test_prompts_en.csv").items[:20]
ZH = load_benchmark(BENCHMARKS / "test_prompts_zh.csv").items[:5]


def forced_scores(item: BenchmarkItem) -> list[int]:
    """A fixed, varied 0/1 list per prompt (about two thirds ones)."""
    return [int(zlib.crc32(f"{item.prompt_id}:{k}".encode()) % 3 != 0) for k in range(len(item.testpoints))]


def answer_regex(scores: list[int]) -> str:
    """An answer the official rules accept: one analysis string and one 0/1 per testpoint."""
    analysis = ", ".join(['"checked"'] * len(scores))
    return re.escape(f"<analysis>[{analysis}]</analysis><score>[{', '.join(map(str, scores))}]</score>")


def forcer(items: list[BenchmarkItem], garbage_ids: frozenset[str] = frozenset()) -> Callable[[str], str | None]:
    def force(text: str) -> str:
        # The judge prompt quotes the benchmark prompt; the longest match is the item asked about.
        item = max((i for i in items if i.prompt in text), key=lambda i: len(i.prompt))
        if item.prompt_id in garbage_ids:
            return re.escape("<analysis>no idea</analysis>I cannot score this")
        return answer_regex(forced_scores(item))

    return force


def expected_accuracies(items: list[BenchmarkItem]) -> tuple[dict[str, float], dict[str, float], float]:
    """Hand computation: sub-dimension, primary-dimension and overall accuracy of the forced scores."""
    sub: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    primary: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for item in items:
        for name, score in zip(item.testpoints, forced_scores(item), strict=True):
            for counts in (sub[name], primary[primary_dimension(name)]):
                counts[0] += score
                counts[1] += 1
    correct = sum(c for c, _ in sub.values())
    total = sum(t for _, t in sub.values())
    return (
        {k: c / t for k, (c, t) in sub.items()},
        {k: c / t for k, (c, t) in primary.items()},
        correct / total,
    )


def start_eval(judge_url: str, results: Path, **overrides: object) -> ServiceThread:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "http_port": 0,
        "grpc_port": 0,
        "log_format": "text",
        "judge_url": judge_url,
        "templates_dir": SHARED_DATA / "templates",
        "unigenbench_data_dir": BENCHMARKS,
        "benchmark": "test_prompts_en",
        "prompt_limit": 20,
        "judge_max_tokens": 256,
        "judge_health_poll_s": 0.3,
        "judge_max_attempts": 2,
        "judge_breaker_failures": 2,
        "judge_breaker_reset_s": 60.0,
        "results_dir": results,
    }
    values.update(overrides)
    return ServiceThread(EvalSettings(**values), eval_component).start()
