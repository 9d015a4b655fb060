"""Parsing the judge's answer: one binary score per testpoint, plus its analysis for the logs.

The official template asks for
    <analysis>[ "...", "..." ]</analysis>
    <score>[1, 0]</score>
inside a <description> block. Rules (tolerant on form, strict on content):
- Tags are matched case-insensitively, with spaces allowed inside them (`< Score >`, `</ score>`) and
  full-width angle brackets (`＜score＞`). When there are several <score> blocks (the model echoes the
  format, or restates its answer) the LAST one wins, as the final answer comes last; the same holds
  for <analysis>.
- Inside <score>: full-width characters are folded to ASCII (`［１，０］`), `【】` count as brackets and
  `、` as a comma; the enclosing brackets are optional; values are separated by commas and/or
  whitespace; a value may be quoted (`"1"`, `'0'`, `“1”`) and may be written `1.0` / `0.0`.
- Strict: there must be exactly one value per testpoint and every value must be 0 or 1. Anything
  else is a ParseFailure with a reason, which the caller retries and counts (never a score of 0).
- <analysis> is optional and returned verbatim (stripped); it is not validated, since only the
  scores enter the accuracies.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

FailureReason = Literal["missing_tag", "malformed", "wrong_length", "non_binary"]

_LT, _GT = "[<\uff1c]", "[>\uff1e]"  # "<" / ">" and their full-width forms


def _tag(name: str) -> re.Pattern[str]:
    return re.compile(rf"{_LT}\s*{name}\s*{_GT}(.*?){_LT}\s*/\s*{name}\s*{_GT}", re.IGNORECASE | re.DOTALL)


_SCORE = _tag("score")
_ANALYSIS = _tag("analysis")
# NFKC folds the full-width forms (［］，０１＂); these CJK marks have no ASCII decomposition.
_CJK_PUNCTUATION = str.maketrans({"【": "[", "】": "]", "、": ",", "“": '"', "”": '"', "‘": "'", "’": "'"})
_SEPARATORS = re.compile(r"[,;\s]+")
_QUOTES = "\"'`"
_BINARY = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}


@dataclass(frozen=True)
class JudgeAnswer:
    """A parsed answer: `scores[i]` in {0, 1} for testpoint i; `analysis` None when the tag is absent."""

    scores: list[int]
    analysis: str | None


@dataclass(frozen=True)
class ParseFailure:
    """Why an answer could not be used; `detail` quotes the offending part for the logs."""

    reason: FailureReason
    detail: str


def parse_answer(text: str | None, n_testpoints: int) -> JudgeAnswer | ParseFailure:
    """Parse the judge's `text` for an item with `n_testpoints` (>= 1) testpoints."""
    if n_testpoints < 1:
        raise ValueError(f"n_testpoints must be >= 1, got {n_testpoints}")
    scores_found = _SCORE.findall(text or "")
    if not scores_found:
        return ParseFailure("missing_tag", f"no <score>...</score> in the answer: {_excerpt(text or '')}")
    raw = scores_found[-1]
    values = _split_scores(raw)
    if values is None:
        return ParseFailure("malformed", f"<score> is not a flat list: {_excerpt(raw)}")
    if len(values) != n_testpoints:
        return ParseFailure("wrong_length", f"{len(values)} scores for {n_testpoints} testpoints: {_excerpt(raw)}")
    scores = []
    for value in values:
        if value not in _BINARY:
            return ParseFailure("non_binary", f"score {value!r} is not 0 or 1: {_excerpt(raw)}")
        scores.append(_BINARY[value])
    analyses = _ANALYSIS.findall(text or "")
    return JudgeAnswer(scores, analyses[-1].strip() if analyses else None)


def _split_scores(raw: str) -> list[str] | None:
    """The unquoted values of a score list, or None when its brackets are not one flat pair."""
    body = unicodedata.normalize("NFKC", raw).translate(_CJK_PUNCTUATION).strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    if "[" in body or "]" in body:
        return None
    return [token.strip(_QUOTES) for token in _SEPARATORS.split(body) if token.strip(_QUOTES)]


def _excerpt(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "...")
