"""The judge's prompt: the official UniGenBench template filled with one benchmark item.

The template, the testpoint definitions and the per-language headers are data files loaded from
`TEMPLATES_DIR`. Filling reproduces the official evaluation script: `{testpoint}` is the Python list
of testpoint names (`['Style', 'World Knowledge']`), and `{explanation}` / `{test_explanation}` are
blocks of the form `<header>:「\\n<name>: <text>\\n...\\n」` with one line per testpoint, in item order.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deepgen_common.eval_results import primary_dimension
from eval_unigenbench.benchmark import BenchmarkItem, Language, check_language

LANG_KEYS_FILE = "unigenbench_lang_keys.json"
PLACEHOLDERS = ("prompt", "testpoint", "explanation", "test_explanation")
NO_DEFINITION = "(no definition)"
_PLACEHOLDER = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")

DefinitionSource = Literal["exact", "primary", "missing"]


def template_file(language: Language) -> str:
    return f"unigenbench_{language}.txt"


def explanations_file(language: Language) -> str:
    return f"unigenbench_explanations_{language}.json"


@dataclass(frozen=True)
class Templates:
    """Everything the judge prompt of one language is built from.

    `explanations` maps a testpoint name (e.g. "Attribute - Color") to its definition;
    `checkpoint_header` / `checkpoint_desc_header` title the definition and description blocks.
    """

    language: Language
    template: str
    explanations: dict[str, str]
    checkpoint_header: str
    checkpoint_desc_header: str

    @classmethod
    def load(cls, directory: Path | str, language: Language) -> Templates:
        """Read the template, the explanations and the language keys of `language` from `directory`.
        Raises FileNotFoundError / ValueError naming the file and the fix."""
        directory = Path(directory)
        language = check_language(language)
        template_path = _require(directory, template_file(language))
        template = template_path.read_text(encoding="utf-8")
        missing = [p for p in PLACEHOLDERS if "{" + p + "}" not in template]
        if missing:
            names = ", ".join("{" + p + "}" for p in missing)
            raise ValueError(f"judge template {template_path} lacks the placeholder(s) {names}")
        explanations_path = _require(directory, explanations_file(language))
        explanations = _read_json(explanations_path)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in explanations.items()):
            raise ValueError(f"{explanations_path} must map testpoint names to definition strings")
        keys_path = _require(directory, LANG_KEYS_FILE)
        keys = _read_json(keys_path).get(language)
        headers = ("checkpoint_header", "checkpoint_desc_header")
        if not isinstance(keys, dict) or not all(isinstance(keys.get(h), str) for h in headers):
            raise ValueError(f"{keys_path} must hold {language!r}: {{{', '.join(repr(h) + ': str' for h in headers)}}}")
        return cls(language, template, explanations, keys["checkpoint_header"], keys["checkpoint_desc_header"])

    def definition(self, testpoint: str) -> tuple[str, DefinitionSource]:
        """The definition of a testpoint and where it came from. An unknown sub-dimension falls back to
        its primary dimension's definition ("Attribute - Hue" -> "Attribute", when defined), since the
        primary dimension still tells the judge what kind of check it is; with neither, the prompt says
        NO_DEFINITION rather than failing the whole benchmark (the official script raises instead)."""
        if testpoint in self.explanations:
            return self.explanations[testpoint], "exact"
        primary = primary_dimension(testpoint)
        if primary in self.explanations:
            return self.explanations[primary], "primary"
        return NO_DEFINITION, "missing"


def build_judge_prompt(item: BenchmarkItem, templates: Templates) -> str:
    """The official judge prompt for `item` (the text part; the image is sent next to it)."""
    explanation = _block(templates.checkpoint_header, [(t, templates.definition(t)[0]) for t in item.testpoints])
    test_explanation = _block(
        templates.checkpoint_desc_header, list(zip(item.testpoints, item.descriptions, strict=True))
    )
    values = {
        "prompt": item.prompt,
        # str() of the list, as the official script formats it: "['Style', 'World Knowledge']".
        "testpoint": str(list(item.testpoints)),
        "explanation": explanation,
        "test_explanation": test_explanation,
    }
    # One pass over the template: braces elsewhere stay as they are, and a prompt that happens to
    # contain "{testpoint}" is not expanded again (sequential str.replace calls would do that).
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], templates.template)


def definition_gaps(items: Iterable[BenchmarkItem], templates: Templates) -> dict[DefinitionSource, Counter[str]]:
    """How often testpoint names of `items` are defined only through their primary dimension
    ("primary") or not at all ("missing"); log these at start-up, as the judge sees less context."""
    gaps: dict[DefinitionSource, Counter[str]] = {"primary": Counter(), "missing": Counter()}
    for item in items:
        for testpoint in item.testpoints:
            source = templates.definition(testpoint)[1]
            if source != "exact":
                gaps[source][testpoint] += 1
    return gaps


def _block(header: str, lines: list[tuple[str, str]]) -> str:
    body = "".join(f"\n{name}: {text}" for name, text in lines)
    return f"{header}:\u300c{body}\n\u300d"


def _require(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(
            f"UniGenBench judge file {path} not found: set TEMPLATES_DIR to the folder holding {name} "
            "(the official UniGenBench templates)"
        )
    return path


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value
