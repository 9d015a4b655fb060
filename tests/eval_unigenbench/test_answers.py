"""Parsing judge answers. The answers below are written in the judge's output format (the 32B
UniGenBench eval model cannot run here): the <description> block the official template asks for,
with the usual deviations seen from VLM judges (spacing, case, Chinese punctuation, echoes)."""

from __future__ import annotations

import pytest

from eval_unigenbench.answers import JudgeAnswer, ParseFailure, parse_answer

WELL_FORMED = """<description>
    <prompt>In the style of classical ink painting, against the background of Egyptian pyramids, \
two pandas wearing spacesuits are leisurely tasting bamboo.</prompt>
    <checkpoint>['Style', 'World Knowledge', 'Attribute - Quantity']</checkpoint>
    <analysis>["The image uses monochrome ink washes with visible brush strokes, as in classical ink painting.",
    "Three pyramids stand on the horizon behind the pandas.",
    "There are two pandas, both wearing white spacesuits."]</analysis>
    <score>[1, 1, 1]</score>
</description>"""

CHINESE = """<description>
    <prompt>古典水墨画风格，埃及金字塔的背景下，两只穿着宇航服的熊猫正在悠闲地品尝竹子。</prompt>
    <checkpoint>['风格', '世界知识', '属性-数量']</checkpoint>
    <analysis>["画面采用水墨晕染，具有古典水墨画的笔触。", "背景中可见金字塔。", "画面中只有一只熊猫。"]</analysis>
    <score>［１，１，０］</score>
</description>"""

ECHO_THEN_ANSWER = """<description>
    <prompt>a red bus</prompt>
    <checkpoint>['Attribute - Color']</checkpoint>
    <analysis>A list using square brackets `[]`, where each element is a string ...</analysis>
    <score>A list using square brackets `[]`, where each element is a binary score (0 or 1)</score>
</description>
Let me now evaluate the image.
<description>
    <prompt>a red bus</prompt>
    <checkpoint>['Attribute - Color']</checkpoint>
    <analysis>["The bus is painted red."]</analysis>
    <score>[1]</score>
</description>"""


def test_well_formed():
    answer = parse_answer(WELL_FORMED, 3)
    assert isinstance(answer, JudgeAnswer)
    assert answer.scores == [1, 1, 1]
    assert answer.analysis is not None
    assert answer.analysis.startswith('["The image uses monochrome ink washes')


def test_chinese_output_with_full_width_brackets_digits_and_commas():
    assert parse_answer(CHINESE, 3) == JudgeAnswer([1, 1, 0], CHINESE.split("<analysis>")[1].split("</analysis>")[0])


@pytest.mark.parametrize(
    "score",
    [
        "[1,0,1]",
        "\n   [ 1 ,\n 0 , 1 ]\n  ",
        "[1，0，1]",
        "【1、0、1】",
        "['1', '0', '1']",
        '["1", "0", "1"]',
        "[“1”, “0”, “1”]",
        "1, 0, 1",
        "[1 0 1]",
        "[1.0, 0.0, 1.0]",
        "[1, 0, 1,]",
    ],
)
def test_tolerated_score_forms(score: str):
    answer = parse_answer(f"<analysis>ok</analysis>\n<score>{score}</score>", 3)
    assert answer == JudgeAnswer([1, 0, 1], "ok")


@pytest.mark.parametrize(
    "text",
    [
        "<SCORE>[1, 0]</SCORE>",
        "< score >[1, 0]</ score >",
        "<Score>[1, 0]</score >",
        "＜score＞[1, 0]＜/score＞",
    ],
)
def test_tag_case_spacing_and_full_width_angle_brackets(text: str):
    assert parse_answer(text, 2) == JudgeAnswer([1, 0], None)  # analysis is optional


def test_last_score_wins_when_the_format_is_echoed():
    answer = parse_answer(ECHO_THEN_ANSWER, 1)
    assert answer == JudgeAnswer([1], '["The bus is painted red."]')


def test_last_score_wins_when_the_judge_corrects_itself():
    text = "<score>[1, 1]</score> On reflection the second item is missing. <score>[1, 0]</score>"
    assert parse_answer(text, 2) == JudgeAnswer([1, 0], None)


@pytest.mark.parametrize(
    ("text", "reason", "detail"),
    [
        (None, "missing_tag", "no <score>"),
        ("", "missing_tag", "no <score>"),
        ("The image satisfies all checkpoints: [1, 1, 1]", "missing_tag", "no <score>"),
        ("<analysis>[...]</analysis>\n<score>[1, 1, 1]", "missing_tag", "no <score>"),  # truncated answer
        ("<score>[1, 1]</score>", "wrong_length", "2 scores for 3 testpoints"),
        ("<score>[1, 0, 1, 1]</score>", "wrong_length", "4 scores for 3 testpoints"),
        ("<score>[]</score>", "wrong_length", "0 scores for 3 testpoints"),
        ("<score>[1, 0.5, 1]</score>", "non_binary", "'0.5' is not 0 or 1"),
        ("<score>[1, 2, 0]</score>", "non_binary", "'2' is not 0 or 1"),
        ("<score>[yes, no, yes]</score>", "non_binary", "'yes' is not 0 or 1"),
        ("<score>[True, False, True]</score>", "non_binary", "'True' is not 0 or 1"),
        ("<score>[1, -1, 0]</score>", "non_binary", "'-1' is not 0 or 1"),
        ("<score>[[1], [0], [1]]</score>", "malformed", "not a flat list"),
        ("<score>[1, 0, 1</score>", "malformed", "not a flat list"),
    ],
)
def test_failures_have_a_reason(text: str | None, reason: str, detail: str):
    failure = parse_answer(text, 3)
    assert isinstance(failure, ParseFailure)
    assert failure.reason == reason
    assert detail in failure.detail


def test_a_wrong_last_answer_is_not_rescued_by_an_earlier_one():
    # Last one wins strictly: the earlier well-formed list does not replace a broken final answer.
    failure = parse_answer("<score>[1, 0]</score> ... <score>[1]</score>", 2)
    assert failure == ParseFailure("wrong_length", "1 scores for 2 testpoints: '[1]'")


def test_needs_at_least_one_testpoint():
    with pytest.raises(ValueError, match="n_testpoints must be >= 1"):
        parse_answer("<score>[]</score>", 0)
