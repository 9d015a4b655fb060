"""Text-rendering score of one image: how well the OCR'd text matches the prompt's quoted text.

Pure functions (DESIGN.md §3 "reward-ocr"):
1. targets = every "..." (or “...”) span of the prompt; none -> not applicable;
2. drop OCR tokens below `min_conf`;
3. normalise (no whitespace; letters and digits only if `ignore_punct`; lower case unless
   `case_sensitive`);
4. candidates = each token, every run of 2..`ngram_max` adjacent tokens joined, all tokens joined;
5. per target of length L: d = min Levenshtein distance over candidates (also after folding
   look-alikes when `confusion_fold`), capped at L;
6. score = Σ(Lᵢ − dᵢ) / ΣLᵢ, the length-weighted mean of 1 − dᵢ/Lᵢ, in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rapidfuzz.distance import Levenshtein

# Look-alikes OCR confuses; folding maps both sides onto one character. Applied after lower-casing,
# so a folded comparison is also case-insensitive.
_FOLD = str.maketrans({"0": "o", "1": "l", "i": "l", "j": "l", "5": "s", "v": "w"})


@dataclass(frozen=True)
class ScoringConfig:
    min_conf: float = 0.0
    ignore_punct: bool = True
    case_sensitive: bool = True
    ngram_max: int = 3
    confusion_fold: bool = True

    def __post_init__(self) -> None:
        if self.ngram_max < 1:
            raise ValueError(f"ngram_max must be >= 1, got {self.ngram_max}")


@dataclass(frozen=True)
class Token:
    """One OCR'd text line or word with the engine's confidence in [0, 1]."""

    text: str
    confidence: float


def quoted_spans(prompt: str) -> list[str]:
    """Every straight- or curly-quoted span of the prompt, in order, in time linear in its length.

    A span opens at the leftmost `"` or `“` and closes at the next `"` or `”` respectively; an opening
    quote that is never closed is skipped. A regular expression gives the same spans but rescans the
    rest of the prompt from every unclosed quote, which is quadratic (50,000 unclosed `“` took seconds).
    Here each character is scanned at most once per quote kind: an opener whose closer is missing
    means no later opener of that kind can close either, so that kind is dropped.
    """
    spans: list[str] = []
    kinds = {'"': '"', "“": "”"}  # opener -> closer, for the kinds that can still close
    next_open = {opener: prompt.find(opener) for opener in kinds}
    pos = 0
    while kinds:
        for opener in kinds:
            if 0 <= next_open[opener] < pos:
                next_open[opener] = prompt.find(opener, pos)
        found = [(at, opener) for opener, at in next_open.items() if opener in kinds and at >= 0]
        if not found:
            break
        start, opener = min(found)
        end = prompt.find(kinds[opener], start + 1)
        if end < 0:
            del kinds[opener]
            continue
        spans.append(prompt[start + 1 : end])
        pos = end + 1
    return spans


def normalize(text: str, config: ScoringConfig) -> str:
    text = "".join(text.split())
    if config.ignore_punct:  # str.isalnum keeps letters and digits of every script, not just ASCII
        text = "".join(ch for ch in text if ch.isalnum())
    return text if config.case_sensitive else text.lower()


def _fold(text: str) -> str:
    return text.lower().translate(_FOLD)


def candidates(tokens: Sequence[str], ngram_max: int) -> list[str]:
    """Each token, each run of 2..ngram_max adjacent tokens joined, and all tokens joined."""
    out = set(tokens)
    for n in range(2, ngram_max + 1):
        out.update("".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    out.add("".join(tokens))
    out.discard("")
    return sorted(out)


def _distance(target: str, pool: Sequence[str]) -> int:
    if not pool:
        return len(target)
    return min(Levenshtein.distance(target, c, score_cutoff=len(target)) for c in pool)


def score_text(prompt: str, tokens: Sequence[Token], config: ScoringConfig) -> float | None:
    """Score in [0, 1], or None when the prompt quotes no text (the reward does not apply)."""
    targets = [t for t in (normalize(s, config) for s in quoted_spans(prompt)) if t]
    if not targets:
        return None
    kept = [normalize(t.text, config) for t in tokens if t.confidence >= config.min_conf]
    pool = candidates([t for t in kept if t], config.ngram_max)
    folded_pool = sorted({_fold(c) for c in pool}) if config.confusion_fold else []
    matched = 0
    total = 0
    for target in targets:
        d = _distance(target, pool)
        if config.confusion_fold:
            d = min(d, _distance(_fold(target), folded_pool))
        d = min(d, len(target))
        matched += len(target) - d
        total += len(target)
    return matched / total
