"""Outcome rewards: format gate, numerical (fast path vs math-verify), MC, OCR, free-form."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sophiavl_mcore.rewards.outcome import (
    OutcomeSample,
    ProblemTypeError,
    check_problem_type,
    fast_numeric_verdict,
    math_verify_equal,
    option_letters,
    parse_response,
    score_outcomes,
    solution_answer,
)


def wrap(answer: str, think: str = "some reasoning") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


# ------------------------------------------------------------------ format gate


@pytest.mark.parametrize(
    "text, well_formed",
    [
        ("<think>a</think><answer>b</answer>", True),
        ("  <think>a\nb</think>\n\n<answer> b </answer>\n", True),
        ("<answer>b</answer>", False),
        ("<think>a</think>", False),
        ("<answer>b</answer><think>a</think>", False),
        ("<think>a</think><answer>b</answer> trailing text", False),
        ("<think>a</think><think>again</think><answer>b</answer>", False),
        ("<think>a</think><answer>b</answer><answer>c</answer>", False),
        ("", False),
    ],
)
def test_format_gate(text: str, well_formed: bool) -> None:
    assert parse_response(text).well_formed is well_formed


def test_malformed_response_scores_zero_even_if_answer_is_right() -> None:
    samples = [
        OutcomeSample("numerical", "<answer>3</answer>", "The answer is <answer>3</answer>"),
        OutcomeSample("numerical", "<answer>3</answer>", wrap("3")),
    ]
    scores = score_outcomes(samples)
    assert scores.reward.tolist() == [0.0, 1.0]
    assert scores.stats.malformed == 1


def test_optional_format_reward_adds_weight_for_well_formed() -> None:
    samples = [
        OutcomeSample("numerical", "<answer>3</answer>", wrap("4")),
        OutcomeSample("numerical", "<answer>3</answer>", "no tags 3"),
    ]
    scores = score_outcomes(samples, format_weight=0.5)
    assert scores.reward.tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="format_weight"):
        score_outcomes(samples, format_weight=-1)


def test_solution_answer_strips_tags() -> None:
    assert solution_answer("<answer> 12 </answer>") == "12"
    assert solution_answer("12") == "12"


# ------------------------------------------------------------------ numerical


@pytest.mark.parametrize(
    "gold, answer",
    [
        ("0.5", "1/2"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "$\\frac{1}{2}$"),
        ("3", "\\boxed{3}"),
        ("3", "3.0"),
        ("-4", "-4.00"),
        ("50%", "0.5"),
        ("5", "5 cm"),
        ("1000", "1,000"),
        ("\\sqrt{2}", "\\sqrt{2}"),
        ("2\\pi", "2\\pi"),
    ],
)
def test_numerical_equivalences(gold: str, answer: str) -> None:
    scores = score_outcomes([OutcomeSample("numerical", f"<answer>{gold}</answer>", wrap(answer))])
    assert scores.reward[0] == 1.0


@pytest.mark.parametrize("gold, answer", [("3", "4"), ("0.5", "1/3"), ("12", "12.01"), ("2", "x"), ("7", "")])
def test_numerical_mismatches(gold: str, answer: str) -> None:
    scores = score_outcomes([OutcomeSample("numerical", f"<answer>{gold}</answer>", wrap(answer))])
    assert scores.reward[0] == 0.0


def test_fast_path_handles_plain_numbers_and_defers_the_rest() -> None:
    assert fast_numeric_verdict("0.5", "1/2") is True
    assert fast_numeric_verdict("3", "4") is False
    assert fast_numeric_verdict("\\sqrt{2}", "1.4142") is None
    assert fast_numeric_verdict("1/3", "0.3333333") is None  # near tie: math-verify's rounding decides
    samples = [OutcomeSample("numerical", "<answer>1</answer>", wrap(a)) for a in ["1", "2", "\\sqrt{1}"]]
    stats = score_outcomes(samples).stats
    assert stats.numerical_total == 3 and stats.numerical_slow_path == 1
    assert stats.slow_path_fraction == pytest.approx(1 / 3)


def _number_text(value: Fraction, style: int) -> str:
    if style == 0 and value.denominator == 1:
        return str(value.numerator)
    if style == 1:
        return f"{value.numerator}/{value.denominator}"
    if style == 2:
        sign = "-" if value < 0 else ""
        return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"
    return f"{float(value):.6f}"


@settings(max_examples=60, deadline=None)
@given(
    st.fractions(min_value=-1000, max_value=1000, max_denominator=16),
    st.fractions(min_value=-1000, max_value=1000, max_denominator=16),
    st.integers(0, 3),
    st.integers(0, 3),
    st.booleans(),
)
def test_fast_path_agrees_with_math_verify(a: Fraction, b: Fraction, sa: int, sb: int, same: bool) -> None:
    """Whenever the fast path decides, math-verify decides the same way."""
    if same:
        b = a
    gold, answer = _number_text(a, sa), _number_text(b, sb)
    verdict = fast_numeric_verdict(gold, answer)
    if verdict is not None:
        assert verdict == math_verify_equal(gold, answer), (gold, answer)


# ------------------------------------------------------------------ multiple choice


@pytest.mark.parametrize(
    "answer, letters",
    [
        ("B", {"B"}),
        ("(B)", {"B"}),
        ("B.", {"B"}),
        ("b", {"B"}),
        ("B) the triangle", {"B"}),
        ("B, D", {"B", "D"}),
        ("D and B", {"B", "D"}),
        ("Answer: C", {"C"}),
        ("The answer is A", {"A"}),
        ("", set()),
        ("I am not sure", set()),
    ],
)
def test_option_letters(answer: str, letters: set[str]) -> None:
    assert option_letters(answer) == frozenset(letters)


def test_option_text_maps_to_its_letter() -> None:
    options = ("A. red", "B. green", "C. blue")
    assert option_letters("green", options) == {"B"}
    assert option_letters("Blue.", ("red", "green", "blue")) == {"C"}


def test_multiple_choice_sets_must_match() -> None:
    samples = [
        OutcomeSample("multiple choice", "<answer>B, D</answer>", wrap("D, B")),
        OutcomeSample("multiple choice", "<answer>B, D</answer>", wrap("B")),
        OutcomeSample("multiple choice", "<answer>(C)</answer>", wrap("c")),
    ]
    assert score_outcomes(samples).reward.tolist() == [1.0, 0.0, 1.0]


# ------------------------------------------------------------------ OCR and free-form


def test_ocr_reward_is_exp_minus_wer() -> None:
    # Hand-computed: reference has 4 words, hypothesis substitutes one and drops one: WER 2/4.
    samples = [
        OutcomeSample("OCR", "<answer>the quick brown fox</answer>", wrap("the quack brown")),
        OutcomeSample("OCR", "<answer>exit 12</answer>", wrap("exit 12")),
    ]
    reward = score_outcomes(samples).reward
    assert reward[0] == pytest.approx(math.exp(-0.5), abs=1e-12)
    assert reward[1] == 1.0


def test_free_form_reward_is_mean_rouge_f() -> None:
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_score.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    gold, answer = "The cats are running across the garden", "a cat runs across gardens quickly"
    expected = np.mean([s.fmeasure for s in scorer.score(gold, answer).values()])
    reward = score_outcomes([OutcomeSample("free-form", f"<answer>{gold}</answer>", wrap(answer))]).reward
    assert reward[0] == pytest.approx(expected, abs=1e-9)


def test_unknown_problem_type_names_record() -> None:
    with pytest.raises(ProblemTypeError, match=r"data.jsonl record 7.*'essay'"):
        check_problem_type("essay", "data.jsonl record 7")
    with pytest.raises(ProblemTypeError, match="sample 1"):
        score_outcomes([OutcomeSample("OCR", "a", wrap("a")), OutcomeSample("math", "1", wrap("1"))])


def test_text_problem_type_is_graded_like_free_form() -> None:
    """The released data's ``text`` type: ROUGE as for free-form (before issue 17's fix
    ``check_problem_type`` rejected it)."""
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_score.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    gold, answer = "a red double-decker bus", "the red bus"
    expected = np.mean([s.fmeasure for s in scorer.score(gold, answer).values()])
    scores = score_outcomes([OutcomeSample("text", f"<answer>{gold}</answer>", wrap(answer))])
    assert scores.reward[0] == pytest.approx(expected, abs=1e-9)
    assert scores.stats.per_type_count == {"free-form": 1}
    assert check_problem_type("text", "r") == "free-form"
