"""Parsing judge answers under both rule sets. The answers below are written in the judge's output
format (the 32B UniGenBench eval model cannot run here): the <description> block the official
template asks for, with the usual deviations seen from VLM judges (spacing, case, Chinese punctuation,
echoes, quoting). The expected official verdicts follow `parse_evaluation_response` and
`calculate_scores` of the UniGenBench evaluation code (eval/src/eval_common.py)."""

from __future__ import annotations

import pytest

from eval_unigenbench.answers import ANSWER_RULES, JudgeAnswer, ParseFailure, parse_answer

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


# ------------------------------------------------------------------- recorded answers, both rule sets

MISSING_ANALYSIS = """<description>
    <prompt>a red bus</prompt>
    <checkpoint>['Attribute - Color', 'Entity Layout - Two-Dimensional Space']</checkpoint>
    <score>[1, 0]</score>
</description>"""

SHORT_ANALYSIS = """<description>
    <analysis>["The bus is red."]</analysis>
    <score>[1, 0]</score>
</description>"""

FULL_WIDTH = """<description>
    <analysis>["公交车是红色的。", "公交车不在画面左侧。"]</analysis>
    <score>［1，0］</score>
</description>"""

UNESCAPED_QUOTES = """<description>
    <analysis>["The sign reads "OPEN" in red letters.", "The door is closed."]</analysis>
    <score>[1, 0]</score>
</description>"""

STRING_SCORES = """<description>
    <analysis>["Ink wash strokes.", "No pyramids are visible.", "Two pandas."]</analysis>
    <score>["1", "0", "1"]</score>
</description>"""

FLOAT_SCORES = """<analysis>['ink wash', 'no pyramids', 'two pandas']</analysis>\n<score>[1.0, 0.0, 1.0]</score>"""
BARE_SCORE = """<analysis>["The bus is red."]</analysis><score>1</score>"""
SCORE_TWO = """<analysis>["a", "b", "c"]</analysis><score>[1, 2, 0]</score>"""
TRUNCATED = """<analysis>["a", "b", "c"]</analysis>\n<score>[1, 1, 1]"""
TOO_MANY = """<analysis>["a", "b", "c"]</analysis><score>[1, 0, 1, 1]</score>"""
BOOLEANS = """<analysis>["a", "b", "c"]</analysis><score>[True, False, True]</score>"""
ZH_ASCII = """<description>
    <prompt>两只熊猫</prompt>
    <analysis>["画面采用水墨晕染。", "背景中可见金字塔。", "画面中只有一只熊猫。"]</analysis>
    <score>[1, 1, 0]</score>
</description>"""

# (case, answer, testpoints, official result, tolerant result): a result is the verdict list, or
# the ParseFailure reason.
RECORDED = [
    ("well_formed", WELL_FORMED, 3, [1, 1, 1], [1, 1, 1]),
    ("chinese_ascii_brackets", ZH_ASCII, 3, [1, 1, 0], [1, 1, 0]),
    ("float_scores", FLOAT_SCORES, 3, [1, 0, 1], [1, 0, 1]),
    ("missing_analysis", MISSING_ANALYSIS, 2, "missing_tag", [1, 0]),
    ("analysis_too_short", SHORT_ANALYSIS, 2, "wrong_length", [1, 0]),
    ("full_width_score", FULL_WIDTH, 2, "malformed", [1, 0]),
    ("full_width_everything", CHINESE, 3, "malformed", [1, 1, 0]),
    ("unescaped_quotes_in_analysis", UNESCAPED_QUOTES, 2, "malformed", [1, 0]),
    ("template_echoed_first", ECHO_THEN_ANSWER, 1, "malformed", [1]),
    ("quoted_scores", STRING_SCORES, 3, [0, 0, 0], [1, 0, 1]),  # official: "1" != 1
    ("score_two", SCORE_TWO, 3, [1, 0, 0], "non_binary"),  # official: wrong, stays in the total
    ("bare_score", BARE_SCORE, 1, "malformed", [1]),  # crashes the official code (len of an int)
    ("booleans", BOOLEANS, 3, "non_binary", "non_binary"),
    ("truncated", TRUNCATED, 3, "missing_tag", "missing_tag"),
    ("too_many_scores", TOO_MANY, 3, "wrong_length", "wrong_length"),
]


@pytest.mark.parametrize("rules", ANSWER_RULES)
@pytest.mark.parametrize(("case", "text", "n", "official", "tolerant"), RECORDED, ids=[r[0] for r in RECORDED])
def test_recorded_answers_under_both_rule_sets(case, text, n, official, tolerant, rules):
    expected = official if rules == "official" else tolerant
    parsed = parse_answer(text, n, rules)
    if isinstance(expected, str):
        assert isinstance(parsed, ParseFailure), f"{case} under {rules}: {parsed}"
        assert parsed.reason == expected, parsed.detail
    else:
        assert isinstance(parsed, JudgeAnswer), f"{case} under {rules}: {parsed}"
        assert parsed.scores == expected


def test_official_is_the_default_and_keeps_the_analysis_text():
    answer = parse_answer(WELL_FORMED, 3)
    assert isinstance(answer, JudgeAnswer)
    assert answer.analysis is not None
    assert answer.analysis.startswith('["The image uses monochrome')


def test_official_reads_the_first_answer_when_the_judge_restates_it():
    text = '<analysis>["a", "b"]</analysis><score>[1, 1]</score> Corrected: <score>[1, 0]</score>'
    assert parse_answer(text, 2) == JudgeAnswer([1, 1], '["a", "b"]')


def test_official_tags_are_exact():
    assert parse_answer('<Analysis>["a"]</Analysis><SCORE>[1]</SCORE>', 1) == ParseFailure(
        "missing_tag", "no <analysis> and <score> in the answer: '<Analysis>[\"a\"]</Analysis><SCORE>[1]</SCORE>'"
    )


def test_unknown_rules_are_named():
    with pytest.raises(ValueError, match="valid: official, tolerant"):
        parse_answer(WELL_FORMED, 3, "lenient")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- tolerant rules


def test_tolerant_well_formed():
    answer = parse_answer(WELL_FORMED, 3, "tolerant")
    assert isinstance(answer, JudgeAnswer)
    assert answer.scores == [1, 1, 1]
    assert answer.analysis is not None
    assert answer.analysis.startswith('["The image uses monochrome ink washes')


def test_tolerant_chinese_output_with_full_width_brackets_digits_and_commas():
    assert parse_answer(CHINESE, 3, "tolerant") == JudgeAnswer(
        [1, 1, 0], CHINESE.split("<analysis>")[1].split("</analysis>")[0]
    )


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
def test_tolerant_tolerated_score_forms(score: str):
    answer = parse_answer(f"<analysis>ok</analysis>\n<score>{score}</score>", 3, "tolerant")
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
def test_tolerant_tag_case_spacing_and_full_width_angle_brackets(text: str):
    assert parse_answer(text, 2, "tolerant") == JudgeAnswer([1, 0], None)  # analysis is optional


def test_tolerant_last_score_wins_when_the_format_is_echoed():
    answer = parse_answer(ECHO_THEN_ANSWER, 1, "tolerant")
    assert answer == JudgeAnswer([1], '["The bus is painted red."]')


def test_tolerant_last_score_wins_when_the_judge_corrects_itself():
    text = "<score>[1, 1]</score> On reflection the second item is missing. <score>[1, 0]</score>"
    assert parse_answer(text, 2, "tolerant") == JudgeAnswer([1, 0], None)


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
def test_tolerant_failures_have_a_reason(text: str | None, reason: str, detail: str):
    failure = parse_answer(text, 3, "tolerant")
    assert isinstance(failure, ParseFailure)
    assert failure.reason == reason
    assert detail in failure.detail


def test_tolerant_a_wrong_last_answer_is_not_rescued_by_an_earlier_one():
    # Last one wins strictly: the earlier well-formed list does not replace a broken final answer.
    failure = parse_answer("<score>[1, 0]</score> ... <score>[1]</score>", 2, "tolerant")
    assert failure == ParseFailure("wrong_length", "1 scores for 2 testpoints: '[1]'")


def test_tolerant_needs_at_least_one_testpoint():
    with pytest.raises(ValueError, match="n_testpoints must be >= 1"):
        parse_answer("<score>[]</score>", 0, "tolerant")
