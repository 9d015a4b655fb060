"""The OCR scoring algorithm (DESIGN.md §3) on hand-made token lists, against a naive reference."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from reward_ocr.scoring import ScoringConfig, Token, candidates, normalize, quoted_spans, score_text

DEFAULT = ScoringConfig()


def toks(*texts: str, conf: float = 0.99) -> list[Token]:
    return [Token(t, conf) for t in texts]


def naive_levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_quoted_spans_straight_and_curly():
    assert quoted_spans('a sign "OPEN" and “Café 24” and "" too') == ["OPEN", "Café 24", ""]


# The reference: what the spans are, written as a regular expression (quadratic on unclosed quotes).
NAIVE_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


def naive_quoted_spans(prompt: str) -> list[str]:
    return [straight or curly for straight, curly in NAIVE_QUOTED.findall(prompt)]


def test_quoted_spans_match_the_regular_expression():
    rng = random.Random(0)
    alphabet = 'ab "“”'
    for _ in range(5000):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        assert quoted_spans(prompt) == naive_quoted_spans(prompt), prompt
    for prompt in ['"a', "“a", '“a"b"', '"a“b"c”', '“a”"', '""""', "“““”", '“"”"']:
        assert quoted_spans(prompt) == naive_quoted_spans(prompt), prompt


@pytest.mark.timeout(20)
@pytest.mark.parametrize("unclosed", ["“", '"', '“"', "a“b”c“"])
def test_quoted_spans_is_linear_on_unclosed_quotes(unclosed: str):
    # Finding 1 of issue 8: 50,000 unclosed “ kept a worker busy for 11 s and a 1 MB prompt for about
    # 8 minutes (a regular expression rescans the rest from every quote). A million characters of
    # them parse within the timeout only in linear time.
    prompt = unclosed * (1_000_000 // len(unclosed))
    assert quoted_spans(prompt + '"END"')[-1] == "END"


def test_no_quotes_is_not_applicable_not_zero():
    assert score_text("a cat on a mat", toks("cat"), DEFAULT) is None
    # a quoted span that normalises to nothing is no target either
    assert score_text('a sign saying "!!!"', toks("!!!"), DEFAULT) is None


def test_exact_match_scores_one():
    assert score_text('a sign that says "Hello World"', toks("Hello World"), DEFAULT) == 1.0


def test_wrong_text_scores_by_edit_distance():
    # "HELLO" vs best candidate "HELP": distance 2 (O->P substitution... H-E-L-L-O vs H-E-L-P: sub L->P, del O)
    cfg = ScoringConfig(confusion_fold=False)
    assert score_text('"HELLO"', toks("HELP"), cfg) == pytest.approx(1 - 2 / 5)


def test_missing_text_scores_zero():
    assert score_text('"HELLO"', [], DEFAULT) == 0.0


def test_several_spans_are_length_weighted():
    # targets "AB" (L=2, matched exactly) and "CDEFGH" (L=6, read as "CDEXXX": d=3)
    # score = (2*1 + 6*(1-3/6)) / (2+6) = (2 + 3) / 8
    cfg = ScoringConfig(confusion_fold=False)
    assert score_text('"AB" then "CDEFGH"', toks("AB", "CDEXXX"), cfg) == pytest.approx(5 / 8)


def test_punctuation_and_whitespace_are_ignored_by_default():
    assert score_text('"Hello, World!"', toks("Hello World"), DEFAULT) == 1.0
    strict = ScoringConfig(ignore_punct=False, confusion_fold=False)
    # "Hello,World!" vs "HelloWorld": two insertions over L=12
    assert score_text('"Hello, World!"', toks("Hello World"), strict) == pytest.approx(1 - 2 / 12)


def test_case_sensitivity():
    no_fold = ScoringConfig(confusion_fold=False)
    assert score_text('"Hello"', toks("HELLO"), no_fold) == pytest.approx(1 - 4 / 5)
    assert score_text('"Hello"', toks("HELLO"), ScoringConfig(confusion_fold=False, case_sensitive=False)) == 1.0


def test_confusion_folding_forgives_lookalikes():
    # OCR reads digit 0 for letter O, 1 for l, 5 for S
    assert score_text('"COOL SALE"', toks("C00L 5ALE"), DEFAULT) == 1.0
    assert score_text('"COOL SALE"', toks("C00L 5ALE"), ScoringConfig(confusion_fold=False)) == pytest.approx(1 - 3 / 8)


def test_adjacent_tokens_are_joined_up_to_ngram_max():
    tokens = toks("GRAND", "OPEN", "ING", "SOON")
    assert score_text('"GRAND OPENING"', tokens, DEFAULT) == 1.0  # 3-gram GRAND+OPEN+ING
    # with ngram_max=1 only single tokens and the all-joined string are candidates
    only_single = ScoringConfig(ngram_max=1, confusion_fold=False)
    expected = (
        1 - min(naive_levenshtein("GRANDOPENING", c) for c in ["GRAND", "OPEN", "ING", "SOON", "GRANDOPENINGSOON"]) / 12
    )
    assert score_text('"GRAND OPENING"', tokens, only_single) == pytest.approx(expected)


def test_min_conf_drops_tokens():
    tokens = [Token("HELLO", 0.3)]
    assert score_text('"HELLO"', tokens, DEFAULT) == 1.0
    assert score_text('"HELLO"', tokens, ScoringConfig(min_conf=0.5)) == 0.0


def test_non_latin_letters_are_kept():
    assert normalize("你好，世界!", DEFAULT) == "你好世界"
    assert score_text("海报上写着“你好世界”", toks("你好 世界"), DEFAULT) == 1.0
    assert score_text("海报上写着“你好世界”", toks("你坏世界"), DEFAULT) == pytest.approx(3 / 4)


def test_distance_is_capped_at_target_length():
    cfg = ScoringConfig(confusion_fold=False)
    assert score_text('"AB"', toks("XXXXXXXXXXXX"), cfg) == 0.0


def test_candidates_match_naive_enumeration():
    tokens = ["a", "b", "c", "d"]
    naive = set(tokens) | {"".join(tokens)}
    for n in (2, 3):
        naive |= {"".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}
    assert set(candidates(tokens, 3)) == naive


@pytest.mark.parametrize("target", ["HELLO", "SALE50", "DeepGen"])
def test_score_matches_naive_reference(target: str):
    """Fast path (rapidfuzz, de-duplicated candidates) == a naive loop over every candidate."""
    cfg = ScoringConfig(confusion_fold=False, ignore_punct=True)
    read = ["HEL", "LO", "SALF", "5O", "Deep", "Gem"]
    pool = set(read) | {"".join(read)}
    for n in (2, 3):
        pool |= {"".join(read[i : i + n]) for i in range(len(read) - n + 1)}
    d = min(min(naive_levenshtein(target, c) for c in pool), len(target))
    assert score_text(f'"{target}"', toks(*read), cfg) == pytest.approx(1 - d / len(target))


def test_ngram_max_must_be_positive():
    with pytest.raises(ValueError, match="ngram_max"):
        ScoringConfig(ngram_max=0)


def test_score_is_within_unit_interval():
    for a, b in itertools.product(["", "x", "HELLO", "H3LL0 W0RLD"], repeat=2):
        s = score_text(f'"{a}"', toks(b), DEFAULT)
        assert s is None or 0.0 <= s <= 1.0
