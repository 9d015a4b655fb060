"""Parsing the judge's answers and turning pairwise verdicts into per-image rewards (pure)."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

_ANSWER = re.compile(r"<\s*answer\s*>(.*?)<\s*/\s*answer\s*>", re.IGNORECASE | re.DOTALL)
_WINNER = re.compile(r"^\W*image\s*([12])\s*is\s*better\W*$", re.IGNORECASE)
_POINTWISE = {
    "alignment": re.compile(r"alignment\s*score[^:：]*[:：]\s*([1-5](?:\.\d+)?)", re.IGNORECASE),
    "coherence": re.compile(r"coherence\s*score[^:：]*[:：]\s*([1-5](?:\.\d+)?)", re.IGNORECASE),
    "style": re.compile(r"style\s*score[^:：]*[:：]\s*([1-5](?:\.\d+)?)", re.IGNORECASE),
}

Winner = Literal[1, 2]


def parse_pairwise(answer: str) -> Winner | None:
    """1 or 2 for "Image 1/2 is better" inside the last <answer> tag (case and whitespace
    tolerant); None for anything else, which the caller counts as a tie."""
    found = _ANSWER.findall(answer)
    if not found:
        return None
    match = _WINNER.match(" ".join(found[-1].split()))
    return int(match.group(1)) if match else None  # type: ignore[return-value]


def parse_pointwise(answer: str) -> dict[str, float] | None:
    """The three 1-5 scores of the pointwise template, or None unless all three are present."""
    scores = {}
    for name, pattern in _POINTWISE.items():
        found = pattern.findall(answer)
        if not found:
            return None
        scores[name] = float(found[-1])
    return scores


@dataclass(frozen=True)
class Comparison:
    """Indices (into the request's samples) shown as Image 1 and Image 2."""

    first: int
    second: int


def comparisons(groups: Sequence[Sequence[int]], both_orders: bool) -> list[Comparison]:
    """Every unordered pair within each group (i before j as in the group), plus (j, i) when
    `both_orders`. A group of n yields n(n-1)/2 comparisons, doubled with both orders."""
    out = []
    for members in groups:
        for i, j in itertools.combinations(members, 2):
            out.append(Comparison(i, j))
            if both_orders:
                out.append(Comparison(j, i))
    return out


@dataclass
class Tally:
    """One sample's record over its comparisons; a tie gives each side half a win."""

    wins: float = 0.0
    played: int = 0
    ties: int = 0

    @property
    def win_rate(self) -> float | None:
        """wins / comparisons, or None for a sample that took part in none."""
        return self.wins / self.played if self.played else None


def tally(n: int, judged: Sequence[tuple[Comparison, Winner | None]]) -> list[Tally]:
    """Per-sample tallies of `n` samples from judged comparisons (None = tie)."""
    out = [Tally() for _ in range(n)]
    for comparison, winner in judged:
        first, second = out[comparison.first], out[comparison.second]
        first.played += 1
        second.played += 1
        if winner is None:
            for side in (first, second):
                side.wins += 0.5
                side.ties += 1
        else:
            (first if winner == 1 else second).wins += 1.0
    return out
