"""UniGenBench benchmark files: CSV rows of a prompt plus the testpoints the judge checks it against.

Format: `index,prompt,sub_dims`, where `sub_dims` is a JSON object holding the testpoint names and one
description per testpoint (English keys `Testpoints` / `Testpoint Description`, Chinese keys `考点` /
`考点对应描述`) next to metadata such as the prompt's category. The upstream files name the columns
`prompt_en,sub_dims_en` or `prompt_zh,sub_dims_zh`; both spellings are accepted.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

logger = logging.getLogger(__name__)

Language = Literal["en", "zh"]
LANGUAGES: tuple[Language, ...] = get_args(Language)


@dataclass(frozen=True)
class SubDimKeys:
    """The JSON keys of `sub_dims` that hold the testpoint names and their descriptions."""

    testpoints: str
    descriptions: str


SUB_DIM_KEYS: dict[Language, SubDimKeys] = {
    "en": SubDimKeys(testpoints="Testpoints", descriptions="Testpoint Description"),
    "zh": SubDimKeys(testpoints="考点", descriptions="考点对应描述"),
}
INDEX_COLUMN = "index"
# (prompt column, sub_dims column, language the column names imply or None).
_COLUMN_PAIRS: tuple[tuple[str, str, Language | None], ...] = (
    ("prompt", "sub_dims", None),
    ("prompt_en", "sub_dims_en", "en"),
    ("prompt_zh", "sub_dims_zh", "zh"),
)
# A JSON array with a missing comma (`["a" "b"]`) is repaired at most this many times per row.
_MAX_COMMA_REPAIRS = 3


class BenchmarkError(ValueError):
    """A benchmark file cannot be used; the message names the file, the row and the problem."""


@dataclass(frozen=True)
class BenchmarkItem:
    """One benchmark prompt and the testpoints the judge scores an image of it on.

    `testpoints[i]` is a sub-dimension name such as "Attribute - Color" and `descriptions[i]` says
    what it refers to in this prompt; a name may repeat within an item (with different descriptions).
    `meta` holds the other `sub_dims` keys (categories, subject, sentence structure).
    """

    prompt_id: str
    prompt: str
    testpoints: list[str]
    descriptions: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark, items in file order. `repairs` lists the defects fixed while loading."""

    name: str
    language: Language
    items: list[BenchmarkItem]
    repairs: list[str] = field(default_factory=list)

    @cached_property
    def by_id(self) -> dict[str, BenchmarkItem]:
        """Items by `prompt_id`."""
        return {item.prompt_id: item for item in self.items}


def check_language(language: str) -> Language:
    """`language` as a `Language`, or a ValueError listing the valid names."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; valid: {', '.join(LANGUAGES)}")
    return language  # type: ignore[return-value]


def default_name(path: Path) -> str:
    """The default benchmark name: "unigenbench-en-long" for test_prompts_en_long.csv."""
    stem = path.stem.removeprefix("test_prompts_")
    return "unigenbench-" + stem.replace("_", "-")


def load_benchmark(path: Path | str, language: Language | None = None, name: str | None = None) -> Benchmark:
    """Load and validate a benchmark CSV.

    `language` None detects it from the column names (`prompt_en`/`prompt_zh`) or else from the
    `sub_dims` keys of the first row; every row must then use that language's keys. `name` defaults to
    `default_name(path)`. Raises FileNotFoundError, or BenchmarkError naming the file, the row (its
    line and index) and the problem: missing column, empty field, unparseable JSON, missing key,
    testpoints/descriptions length mismatch, duplicate index.
    """
    path = Path(path)
    if language is not None:
        language = check_language(language)
    if not path.is_file():
        raise FileNotFoundError(
            f"benchmark file {path} not found: set UNIGENBENCH_DATA_DIR to the folder holding the "
            "UniGenBench test_prompts_*.csv files"
        )
    repairs: list[str] = []
    items: list[BenchmarkItem] = []
    first_line: dict[str, int] = {}
    # utf-8-sig: files saved by spreadsheet tools start with a byte-order mark.
    with path.open(encoding="utf-8-sig", newline="") as file:
        reader = csv.DictReader(file)
        prompt_column, sub_dims_column, language = _columns(path, reader.fieldnames, language)
        for row in reader:
            where = f"{path}: line {reader.line_num} (index {row.get(INDEX_COLUMN)!r})"
            prompt_id = (row.get(INDEX_COLUMN) or "").strip()
            if not prompt_id:
                raise BenchmarkError(f"{where}: empty {INDEX_COLUMN!r}")
            if prompt_id in first_line:
                raise BenchmarkError(f"{where}: duplicate index {prompt_id!r} (first on line {first_line[prompt_id]})")
            first_line[prompt_id] = reader.line_num
            # The prompt is kept verbatim (not stripped) so the judge sees exactly the benchmark's text.
            prompt = row.get(prompt_column) or ""
            if not prompt.strip():
                raise BenchmarkError(f"{where}: empty {prompt_column!r}")
            sub_dims = _parse_sub_dims(row.get(sub_dims_column) or "", where, sub_dims_column, repairs)
            if language is None:
                language = _detect_language(sub_dims, where)
            testpoints, descriptions = _testpoints(sub_dims, language, where)
            keys = SUB_DIM_KEYS[language]
            meta = {k: v for k, v in sub_dims.items() if k not in (keys.testpoints, keys.descriptions)}
            items.append(BenchmarkItem(prompt_id, prompt, testpoints, descriptions, meta))
    if not items:
        raise BenchmarkError(f"{path}: no rows after the header")
    for repair in repairs:
        logger.warning("benchmark repaired: %s", repair)
    return Benchmark(name or default_name(path), language, items, repairs)  # type: ignore[arg-type]


def _columns(path: Path, header: list[str] | None, language: Language | None) -> tuple[str, str, Language | None]:
    """The prompt and sub_dims columns to read, and the language the names imply (if any)."""
    if not header:
        raise BenchmarkError(f"{path}: empty file (expected the header {INDEX_COLUMN},prompt,sub_dims)")
    if INDEX_COLUMN not in header:
        raise BenchmarkError(f"{path}: missing column {INDEX_COLUMN!r} (header: {','.join(header)})")
    present = [(p, s, lang) for p, s, lang in _COLUMN_PAIRS if p in header and s in header]
    if language is not None:
        others = [pair for pair in present if pair[2] not in (None, language)]
        # The explicit language picks its own upstream pair when the file has both languages.
        present = sorted((pair for pair in present if pair not in others), key=lambda pair: pair[2] is None)
        if not present and others:
            raise BenchmarkError(
                f"{path}: language={language!r} but the file has only {others[0][2]} columns "
                f"({others[0][0]},{others[0][1]})"
            )
    if not present:
        half = [c for p, s, _ in _COLUMN_PAIRS for c in (p, s) if (p in header) != (s in header) and c not in header]
        missing = f"missing column {half[0]!r}" if half else "missing the prompt and sub_dims columns"
        accepted = " or ".join(f"{p},{s}" for p, s, _ in _COLUMN_PAIRS)
        raise BenchmarkError(f"{path}: {missing}; accepted columns: {accepted} (header: {','.join(header)})")
    if language is None and len(present) > 1 and all(lang is not None for _, _, lang in present):
        raise BenchmarkError(f"{path}: holds both English and Chinese columns; pass language='en' or 'zh'")
    prompt_column, sub_dims_column, implied = present[0]
    return prompt_column, sub_dims_column, language or implied


def _parse_sub_dims(text: str, where: str, column: str, repairs: list[str]) -> dict[str, Any]:
    """The `sub_dims` JSON object. One upstream defect is repaired: a missing comma between two
    strings (e.g. in an array) (test_prompts_en_long.csv index 509 has `"Grammar - Negation" "Attribute -
    Color"`). The decoder reports exactly where it expected the comma, so the repair inserts it
    there and nowhere else; the row must still pass every other check afterwards."""
    if not text.strip():
        raise BenchmarkError(f"{where}: empty {column!r}")
    inserted = 0
    while True:
        try:
            value = json.loads(text)
            break
        except json.JSONDecodeError as error:
            fixable = error.msg == "Expecting ',' delimiter" and text[error.pos : error.pos + 1] == '"'
            if not fixable or inserted == _MAX_COMMA_REPAIRS:
                raise BenchmarkError(f"{where}: {column!r} is not valid JSON: {error}") from None
            text = text[: error.pos] + ", " + text[error.pos :]
            inserted += 1
    if inserted:
        repairs.append(f"{where}: inserted {inserted} missing comma(s) between strings in {column!r}")
    if not isinstance(value, dict):
        raise BenchmarkError(f"{where}: {column!r} must be a JSON object, got {type(value).__name__}")
    return value


def _detect_language(sub_dims: dict[str, Any], where: str) -> Language:
    for language, keys in SUB_DIM_KEYS.items():
        if keys.testpoints in sub_dims:
            return language
    expected = " or ".join(repr(keys.testpoints) for keys in SUB_DIM_KEYS.values())
    raise BenchmarkError(f"{where}: sub_dims has no testpoint key ({expected}); keys: {list(sub_dims)}")


def _testpoints(sub_dims: dict[str, Any], language: Language, where: str) -> tuple[list[str], list[str]]:
    """The validated (testpoints, descriptions) of one row."""
    keys = SUB_DIM_KEYS[language]
    for key in (keys.testpoints, keys.descriptions):
        if key not in sub_dims:
            others = [lang for lang, k in SUB_DIM_KEYS.items() if lang != language and k.testpoints in sub_dims]
            hint = f" (it has the {others[0]} keys: pass language={others[0]!r})" if others else ""
            raise BenchmarkError(f"{where}: sub_dims lacks the {language} key {key!r}{hint}; keys: {list(sub_dims)}")
    testpoints, descriptions = sub_dims[keys.testpoints], sub_dims[keys.descriptions]
    for key, value in ((keys.testpoints, testpoints), (keys.descriptions, descriptions)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BenchmarkError(f"{where}: sub_dims {key!r} must be a list of strings, got {value!r}")
    if not testpoints:
        raise BenchmarkError(f"{where}: sub_dims {keys.testpoints!r} is empty")
    if any(not t.strip() for t in testpoints):
        raise BenchmarkError(f"{where}: sub_dims {keys.testpoints!r} contains an empty name: {testpoints!r}")
    if len(testpoints) != len(descriptions):
        raise BenchmarkError(
            f"{where}: {len(testpoints)} testpoints but {len(descriptions)} descriptions "
            f"({keys.testpoints!r}: {testpoints!r}; {keys.descriptions!r}: {descriptions!r})"
        )
    return testpoints, descriptions
