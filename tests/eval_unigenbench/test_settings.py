"""eval-unigenbench settings: the served sets, the answer rules and the retries from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from eval_unigenbench.settings import EvalSettings


def test_defaults_are_the_official_rules_and_retries(monkeypatch: pytest.MonkeyPatch):
    for var in ("UNIGENBENCH_ANSWER_RULES", "PARSE_RETRIES", "BENCHMARK"):
        monkeypatch.delenv(var, raising=False)
    settings = EvalSettings()
    assert (settings.unigenbench_answer_rules, settings.parse_retries) == ("official", 10)
    assert settings.benchmark_paths == {"en": Path("/data/unigenbench/test_prompts_en.csv")}


def test_sets_and_rules_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("BENCHMARK", "test_prompts_zh_long, test_prompts_en")
    monkeypatch.setenv("UNIGENBENCH_ANSWER_RULES", "tolerant")
    monkeypatch.setenv("UNIGENBENCH_DATA_DIR", "/bench")
    settings = EvalSettings()
    assert settings.unigenbench_answer_rules == "tolerant"
    assert list(settings.benchmark_paths.items()) == [
        ("zh_long", Path("/bench/test_prompts_zh_long.csv")),
        ("en", Path("/bench/test_prompts_en.csv")),
    ]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("UNIGENBENCH_ANSWER_RULES", "lenient", "'official' or 'tolerant'"),
        ("BENCHMARK", " , ", "name at least one benchmark file stem"),
        ("BENCHMARK", "test_prompts_en,test_prompts_en", "lists a benchmark twice"),
    ],
)
def test_bad_values_say_what_is_valid(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError, match=message):
        EvalSettings()
