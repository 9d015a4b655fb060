"""Parsing judge answers and turning verdicts into rewards, on recorded realistic outputs."""

from __future__ import annotations

import pytest

from reward_unified.verdicts import Comparison, comparisons, parse_pairwise, parse_pointwise, tally

WELL_FORMED = """<think>
1. Semantic consistency:
    Image 1 (9/10) - The pandas wear spacesuits and hold bamboo, matching the caption;
    Image 2 (6/10) - Only one panda is visible and there are no pyramids
2. Aesthetics:
    Image 1 (8/10) - Balanced ink-wash composition;
    Image 2 (7/10) - Pleasant colours but a cluttered background
3. Authenticity:
    Image 1 (8/10) - Consistent brush texture;
    Image 2 (6/10) - Distorted paws
Total score:
Image 1: 9+8+8=25
Image 2: 6+7+6=19
</think>
<answer>Image 1 is better</answer>"""


@pytest.mark.parametrize(
    ("answer", "winner"),
    [
        (WELL_FORMED, 1),
        ("<think>...</think>\n<answer>Image 2 is better</answer>", 2),
        ("<answer>  image 2 IS better. </answer>", 2),  # case, spaces, trailing period
        ("< Answer >\n Image 1\n is better\n</ANSWER>", 1),  # whitespace inside tags and text
        ("<answer>Image1 is better</answer>", 1),
        ("<think>Image 2 is better at first sight</think><answer>Image 1 is better</answer>", 1),
        # the last <answer> decides when a model corrects itself
        ("<answer>Image 2 is better</answer> wait <answer>Image 1 is better</answer>", 1),
    ],
)
def test_pairwise_verdicts(answer: str, winner: int):
    assert parse_pairwise(answer) == winner


@pytest.mark.parametrize(
    "answer",
    [
        "Image 1 is better",  # no tags
        "<think>long reasoning that ran out of tokens",  # truncated
        "<answer>Both images are equally good</answer>",
        "<answer>Image 3 is better</answer>",
        "<answer>Image 1 is better than Image 2 in some ways</answer>",
        "<answer>图像1更好</answer>",  # Chinese answer: not one of the two allowed strings
        "",
    ],
)
def test_anything_else_is_no_verdict(answer: str):
    assert parse_pairwise(answer) is None


def test_pointwise_scores():
    answer = "Alignment Score (1-5): 4\nCoherence Score (1-5): 3.5\nStyle Score (1-5): 5"
    assert parse_pointwise(answer) == {"alignment": 4.0, "coherence": 3.5, "style": 5.0}
    assert parse_pointwise("alignment score (1-5)：2\ncoherence score: 2\n STYLE SCORE (1-5): 1") == {
        "alignment": 2.0,
        "coherence": 2.0,
        "style": 1.0,
    }
    assert parse_pointwise("Alignment Score (1-5): 4\nCoherence Score (1-5): 3") is None  # style missing
    assert parse_pointwise("Alignment Score (1-5): 9\nCoherence Score: 3\nStyle Score: 3") is None  # out of range


def test_comparisons_cover_every_pair_once_or_twice():
    groups = [[0, 1, 2, 3], [4, 5]]
    once = comparisons(groups, both_orders=False)
    assert len(once) == 6 + 1
    assert {(c.first, c.second) for c in once} == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3), (4, 5)}
    twice = comparisons(groups, both_orders=True)
    assert len(twice) == 2 * len(once)
    assert {(c.first, c.second) for c in twice} == {(c.first, c.second) for c in once} | {
        (c.second, c.first) for c in once
    }
    assert comparisons([[7]], both_orders=True) == []


def test_win_rates_hand_computed():
    # group of 3: 0 beats 1, 2 beats 0, 1 vs 2 is a tie -> wins 1, 0.5, 1.5 over 2 comparisons each
    judged = [(Comparison(0, 1), 1), (Comparison(0, 2), 2), (Comparison(1, 2), None)]
    tallies = tally(4, judged)
    assert [t.win_rate for t in tallies] == [0.5, 0.25, 0.75, None]
    assert [t.ties for t in tallies] == [0, 1, 1, 0]
    assert sum(t.wins for t in tallies) == len(judged)  # every comparison hands out exactly one win


def test_position_bias_and_both_orders():
    # a judge that always prefers the first image: rewards fall with position, and sum to n/2 ...
    group = [[0, 1, 2, 3]]
    biased = tally(4, [(c, 1) for c in comparisons(group, both_orders=False)])
    assert [t.win_rate for t in biased] == [1.0, 2 / 3, 1 / 3, 0.0]
    # ... and judging both orders cancels the bias exactly
    fair = tally(4, [(c, 1) for c in comparisons(group, both_orders=True)])
    assert [t.win_rate for t in fair] == [0.5] * 4
