"""Reading the judge's answer: one verdict per testpoint, plus its analysis for the logs.

The official template asks for
    <analysis>["...", "..."]</analysis>
    <score>[1, 0]</score>
inside a <description> block. Two rule sets read it (`UNIGENBENCH_ANSWER_RULES`):

`official` (default): the rules of the UniGenBench evaluation code (`eval/src/eval_common.py`,
`parse_evaluation_response` and `calculate_scores`), so accuracies agree with the leaderboard:
- the FIRST `<analysis>...</analysis>` and the FIRST `<score>...</score>` (exact lower-case tags) must
  both be present; a format template echoed before the real answer is therefore read, and fails;
- both bodies are Python literals (`ast.literal_eval` of the stripped text) and lists (or tuples)
  with exactly one entry per testpoint: full-width `［1，0］`, unquoted words, unescaped quotes inside
  the analysis or a bare `<score>1</score>` (which crashes the official code) are failures;
- a score entry is correct when it equals 1 (`1`, `1.0`); any other value (`0`, `2`, `"1"`) is a
  wrong verdict that stays in the totals, so `["1", "0", "1"]` reads as [0, 0, 0]. A `True`,
  `False` or `None` entry fails here: the official scorer drops such an image when it re-reads its
  results (JSON `true` / `null` are not Python literals), so it never counts there either.

`tolerant` (the alternative): tolerant on form, strict on content.
- Tags are matched case-insensitively, with spaces allowed inside them (`< Score >`, `</ score>`) and
  full-width angle brackets (`＜score＞`). When there are several <score> blocks (the model echoes the
  format, or restates its answer) the LAST one wins, as the final answer comes last; the same holds
  for <analysis>.
- Inside <score>: full-width characters are folded to ASCII (`［１，０］`), `【】` count as brackets and
  `、` as a comma; the enclosing brackets are optional; values are separated by commas and/or
  whitespace; a value may be quoted (`"1"`, `'0'`, `“1”`) and may be written `1.0` / `0.0`.
- There must be exactly one value per testpoint and every value must be 0 or 1.
- <analysis> is optional and not validated, since only the scores enter the accuracies.

Under both rules an answer that cannot be used is a ParseFailure with a reason, which the caller
retries and counts (never a score of 0). The analysis is returned verbatim (stripped).
"""

from __future__ import annotations

import ast
import re
import unicodedata
from dataclasses import dataclass
from typing import Literal, get_args

AnswerRules = Literal["official", "tolerant"]
ANSWER_RULES: tuple[str, ...] = get_args(AnswerRules)
FailureReason = Literal["missing_tag", "malformed", "wrong_length", "non_binary"]


@dataclass(frozen=True)
class JudgeAnswer:
    """A parsed answer: `scores[i]` in {0, 1} is the verdict on testpoint i; `analysis` None when the
    tag is absent (tolerant rules only)."""

    scores: list[int]
    analysis: str | None


@dataclass(frozen=True)
class ParseFailure:
    """Why an answer could not be used; `detail` quotes the offending part for the logs."""

    reason: FailureReason
    detail: str


def parse_answer(text: str | None, n_testpoints: int, rules: AnswerRules = "official") -> JudgeAnswer | ParseFailure:
    """Parse the judge's `text` for an item with `n_testpoints` (>= 1) testpoints under `rules`."""
    if n_testpoints < 1:
        raise ValueError(f"n_testpoints must be >= 1, got {n_testpoints}")
    if rules == "official":
        return _parse_official(text or "", n_testpoints)
    if rules == "tolerant":
        return _parse_tolerant(text or "", n_testpoints)
    raise ValueError(f"unknown answer rules {rules!r}; valid: {', '.join(ANSWER_RULES)}")


# ------------------------------------------------------------------------------------------------ official

_OFFICIAL_SCORE = re.compile(r"<score>(.*?)</score>", re.DOTALL)
_OFFICIAL_ANALYSIS = re.compile(r"<analysis>(.*?)</analysis>", re.DOTALL)


def _parse_official(text: str, n_testpoints: int) -> JudgeAnswer | ParseFailure:
    analysis_match = _OFFICIAL_ANALYSIS.search(text)
    score_match = _OFFICIAL_SCORE.search(text)
    if analysis_match is None or score_match is None:
        missing = " and ".join(
            tag for tag, match in (("<analysis>", analysis_match), ("<score>", score_match)) if match is None
        )
        return ParseFailure("missing_tag", f"no {missing} in the answer: {_excerpt(text)}")
    analysis_text, score_text = analysis_match.group(1).strip(), score_match.group(1).strip()
    analysis = _literal_list(analysis_text)
    if isinstance(analysis, ParseFailure):
        return ParseFailure(analysis.reason, f"<analysis> {analysis.detail}")
    values = _literal_list(score_text)
    if isinstance(values, ParseFailure):
        return ParseFailure(values.reason, f"<score> {values.detail}")
    if len(analysis) != n_testpoints or len(values) != n_testpoints:
        return ParseFailure(
            "wrong_length",
            f"{len(analysis)} analyses and {len(values)} scores for {n_testpoints} testpoints: {_excerpt(score_text)}",
        )
    if any(isinstance(v, bool) or v is None for v in values):
        return ParseFailure("non_binary", f"score True/False/None is not a number: {_excerpt(score_text)}")
    return JudgeAnswer([1 if _equals_one(v) else 0 for v in values], analysis_text)


def _literal_list(body: str) -> list[object] | ParseFailure:
    """`body` as a Python literal list (or tuple), else why not."""
    try:
        value = ast.literal_eval(body)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return ParseFailure("malformed", f"is not a Python literal: {_excerpt(body)}")
    if not isinstance(value, list | tuple):
        return ParseFailure("malformed", f"is a {type(value).__name__}, not a list: {_excerpt(body)}")
    return list(value)


def _equals_one(value: object) -> bool:
    """The official comparison `score == 1`, without evaluating arbitrary objects' __eq__."""
    return isinstance(value, int | float) and value == 1


# ------------------------------------------------------------------------------------------------ tolerant

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


def _parse_tolerant(text: str, n_testpoints: int) -> JudgeAnswer | ParseFailure:
    scores_found = _SCORE.findall(text)
    if not scores_found:
        return ParseFailure("missing_tag", f"no <score>...</score> in the answer: {_excerpt(text)}")
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
    analyses = _ANALYSIS.findall(text)
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
