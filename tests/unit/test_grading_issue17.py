"""Issue 17: numerical and multiple-choice grading.

The numerical fast path is checked against an *independent grader*: the test generates
the exact values (``Fraction``) first and renders them in every form the fast path
reads, so the right verdict comes from the generator, never from the code under test.

Defects these tests caught in the code before the fix (``rewards/outcome.py`` at
c4a9202): two percentages were expanded to {v, v/100} each, so ``3%`` matched ``300%``
and ``50%`` matched ``0.5%`` (``test_percentages_compare_their_numbers``); scientific
notation scored 0 (``test_scientific_notation``); ``**B**``, "C is correct" and "I
think the answer is B." scored 0 (``test_multiple_choice_phrasings``).
"""

from __future__ import annotations

import re
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sophiavl_mcore.rewards.outcome import (
    OutcomeSample,
    fast_numeric_verdict,
    math_verify_equal,
    score_outcomes,
)

# ------------------------------------------------------------------ independent renderer


def _decimal_digits(value: Fraction) -> tuple[int, int] | None:
    """(integer digits, places) with value = digits / 10**places, or None if the
    decimal expansion does not terminate."""
    for places in range(0, 12):
        scaled = value * 10**places
        if scaled.denominator == 1:
            return scaled.numerator, places
    return None


def _plain_decimal(value: Fraction) -> str | None:
    dp = _decimal_digits(abs(value))
    if dp is None:
        return None
    digits, places = dp
    text = str(digits).rjust(places + 1, "0")
    return text if places == 0 else f"{text[:-places]}.{text[-places:]}"


def _grouped(value: Fraction, sep: str) -> str | None:
    text = _plain_decimal(value)
    if text is None:
        return None
    whole, _, frac = text.partition(".")
    if len(whole) < 4:
        return None
    groups = []
    while whole:
        groups.insert(0, whole[-3:])
        whole = whole[:-3]
    return sep.join(groups) + (f".{frac}" if frac else "")


def _scientific(value: Fraction, style: str) -> str | None:
    dp = _decimal_digits(abs(value))
    if dp is None or value == 0:
        return None
    digits, places = dp
    text = str(digits)
    exponent = len(text) - 1 - places
    mantissa = text[0] + (f".{text[1:].rstrip('0')}" if text[1:].rstrip("0") else "")
    if style == "e":
        return f"{mantissa}e{exponent}"
    if style == "times":
        return f"{mantissa}\\times10^{{{exponent}}}"
    return f"{mantissa} \\cdot 10^{{{exponent}}}"


FORMS = ("int", "decimal", "comma", "latex_comma", "slash", "frac", "sci_e", "sci_times",
         "sci_cdot")


def render(value: Fraction, form: str) -> str | None:
    """``|value|`` written in ``form`` (no sign), or None if it cannot be."""
    v = abs(value)
    if form == "int":
        return str(v.numerator) if v.denominator == 1 else None
    if form == "decimal":
        return _plain_decimal(v)
    if form == "comma":
        return _grouped(v, ",")
    if form == "latex_comma":
        return _grouped(v, "{,}")
    if form == "slash":
        return f"{v.numerator}/{v.denominator}"
    if form == "frac":
        return f"\\frac{{{v.numerator}}}{{{v.denominator}}}"
    return _scientific(v, form.removeprefix("sci_"))


PERCENT_FORMS = ("int", "decimal", "comma", "latex_comma")
SIGNS = ("-", "\u2212")
WRAPPERS = ("{}", "${}$", "\\boxed{{{}}}", "\\({}\\)", "$\\boxed{{{}}}$")
UNITS = ("", " cm", " \\text{cm}", "^\\circ", " apples", " km/h")


def decorate(value: Fraction, form: str, percent: bool, unit: str, wrapper: str, sign: str,
             plus: bool) -> str | None:
    body = render(value, form)
    if body is None:
        return None
    if value < 0:
        body = sign + body
    elif plus:
        body = "+" + body
    body += "%" if percent else unit
    return wrapper.format(body)


def expected_verdict(a: Fraction, a_pct: bool, b: Fraction, b_pct: bool) -> bool:
    """The rule, applied to the generated values: two percentages or two plain numbers
    compare values; a percentage against a plain number matches v or v/100."""
    if a_pct == b_pct:
        return a == b
    pct, plain = (a, b) if a_pct else (b, a)
    return plain in (pct, pct / 100)


def near(a: Fraction, b: Fraction) -> bool:
    return a != b and abs(a - b) <= max(abs(a), abs(b), Fraction(1)) * Fraction(1, 10**4)


decimals = st.builds(lambda m, k: Fraction(m) * Fraction(10) ** k,
                     st.integers(-10**7, 10**7), st.integers(-4, 3))
rationals = st.fractions(min_value=-10**4, max_value=10**4, max_denominator=40)
values = st.one_of(decimals, rationals)


@st.composite
def rendered(draw, value: Fraction) -> tuple[str, bool]:
    form = draw(st.sampled_from([f for f in FORMS if render(value, f) is not None]))
    # A quarter are percentages, of the forms a percentage is written in.
    percent = form in PERCENT_FORMS and draw(st.booleans()) and draw(st.booleans())
    text = decorate(value, form, percent, draw(st.sampled_from(UNITS)),
                    draw(st.sampled_from(WRAPPERS)), draw(st.sampled_from(SIGNS)),
                    draw(st.booleans()))
    assert text is not None
    return text, percent


@st.composite
def pairs(draw) -> tuple[Fraction, str, bool, Fraction, str, bool]:
    a = draw(values)
    relation = draw(st.sampled_from(["same", "other", "x100", "div100", "negated"]))
    b = {"same": a, "other": draw(values), "x100": a * 100, "div100": a / 100, "negated": -a}[relation]
    ta, pa = draw(rendered(a))
    tb, pb = draw(rendered(b))
    return a, ta, pa, b, tb, pb


@settings(max_examples=400, deadline=None)
@given(pairs())
def test_fast_path_against_independent_grader(pair) -> None:
    """Every generated pair is decided, and decided right; only near-ties are deferred."""
    a, ta, pa, b, tb, pb = pair
    verdict = fast_numeric_verdict(ta, tb)
    expected = expected_verdict(a, pa, b, pb)
    candidates = [(a, b), (a / 100, b), (a, b / 100)] if pa != pb else [(a, b)]
    if verdict is None:
        assert not expected and any(near(x, y) for x, y in candidates), (ta, tb)
    else:
        assert verdict is expected, (ta, tb, expected)


def _is_scientific(text: str) -> bool:
    return bool(re.search(r"\d[eE][+-]?\d|times\s*10|cdot\s*10|×\s*10", text))


def test_math_verify_misreads_scientific_notation() -> None:
    """Why scientific notation never reaches math-verify: it calls 1.1e2 equal to 11/10."""
    assert math_verify_equal("1.1e2", "11/10")
    assert fast_numeric_verdict("1.1e2", "11/10") is False
    assert fast_numeric_verdict("1.1e2", "110") is True


@settings(max_examples=60, deadline=None)
@given(pairs())
def test_math_verify_never_accepts_what_the_independent_grader_rejects(pair) -> None:
    """On every form the fast path reads, math-verify's "equal" implies the generator's
    (bar the documented U+2212 case): where the two disagree, math-verify is scoring an
    equal pair 0, so the fast path never grades more leniently than math-verify."""
    a, ta, pa, b, tb, pb = pair
    assume(not any("\u2212\\frac" in t for t in (ta, tb)))
    # math-verify misreads scientific notation ("1.1e2" == "11/10"): that form is the
    # fast path's alone (test_math_verify_misreads_scientific_notation)
    assume(not any(_is_scientific(t) for t in (ta, tb)))
    candidates = [(a, b), (a / 100, b), (a, b / 100)] if pa != pb else [(a, b)]
    assume(not any(near(x, y) for x, y in candidates))
    if math_verify_equal(ta, tb):
        assert expected_verdict(a, pa, b, pb), (ta, tb)


@pytest.mark.parametrize("gold, answer, equal", [
    ("3%", "300%", False),
    ("50%", "0.5%", False),
    ("3%", "3\\%", True),
    ("50%", "0.5", True),
    ("50%", "50", True),
    ("0.5", "50%", True),
    ("50%", "5000", False),
])
def test_percentages_compare_their_numbers(gold: str, answer: str, equal: bool) -> None:
    assert fast_numeric_verdict(gold, answer) is equal


@pytest.mark.parametrize("gold, answer", [
    ("1500", "1.5e3"), ("0.00025", "2.5\\times10^{-4}"), ("300000", "3 \\cdot 10^5"),
    ("-0.002", "-2E-3"), ("1200", "1.2×10^3"), ("1500", "$1.5 \\times 10^{3}$"),
])
def test_scientific_notation(gold: str, answer: str) -> None:
    assert fast_numeric_verdict(gold, answer) is True
    scores = score_outcomes([OutcomeSample("numerical", f"<answer>{gold}</answer>",
                                           f"<think>t</think><answer>{answer}</answer>")])
    assert scores.reward[0] == 1.0 and scores.stats.numerical_slow_path == 0
    assert fast_numeric_verdict(str(float(gold) * 10), answer) is False


@pytest.mark.parametrize("gold, answer, ours", [
    ("1500", "1.5e3", True),
    ("0.00025", "2.5\\times10^{-4}", True),
    ("1000", "1{,}000", True),
    ("3", "\\$3", True),
    ("0.5", "50\\%", True),
    ("1/3", "\u2212\\frac{1}{3}", False),
])
def test_documented_divergences_from_math_verify(gold: str, answer: str, ours: bool) -> None:
    """The divergences listed in ``rewards/numeric.py``'s docstring: ours, and
    math-verify's different verdict (this fails if math-verify starts agreeing, so the
    list stays true)."""
    assert fast_numeric_verdict(gold, answer) is ours
    assert math_verify_equal(gold, answer) is not ours


@pytest.mark.parametrize("answer", ["2x", "2 x", "2 pi", "5 million", "1,5", "10^{3}", "1e999"])
def test_not_plain_numbers_go_to_math_verify(answer: str) -> None:
    assert fast_numeric_verdict("2", answer) is None


# ------------------------------------------------------------------ multiple choice

MC_TABLE = [
    # (reply, gold, correct?)
    ("B", "B", True),
    ("**B**", "B", True),
    ("__B__", "B", True),
    ("`B`", "B", True),
    ("$\\boxed{B}$", "B", True),
    ("\\text{(B)}", "B", True),
    ("[B]", "B", True),
    ("C is correct", "C", True),
    ("C is correct.", "C", True),
    ("**C** is the correct answer.", "C", True),
    ("I think the answer is B.", "B", True),
    ("The final answer is (D).", "D", True),
    ("**Answer:** C", "C", True),
    ("Option B: green", "B", True),
    ("I choose B", "B", True),
    ("I would go with (A).", "A", True),
    ("The answer is B, not C.", "B", True),
    ("Between A and B, A is correct.", "A", True),
    ("A is wrong; the answer is B", "B", True),
    ("B and D", "B, D", True),
    # two different letters where one is expected: never correct
    ("B or C", "B", False),
    ("The answer is B or C.", "B", False),
    ("B, C", "B", False),
    ("A is correct. No wait, B is correct.", "A", False),
    ("The answer is A or D", "A", False),
    ("I think B is correct", "B", True),
    ("So the answer is: **B**", "B", True),
    # no committed letter
    ("A cat", "A", False),
    ("I am not sure", "A", False),
    ("", "A", False),
    ("B is wrong", "B", False),
]


@pytest.mark.parametrize("reply, gold, correct", MC_TABLE)
def test_multiple_choice_phrasings(reply: str, gold: str, correct: bool) -> None:
    sample = OutcomeSample("multiple choice", f"<answer>{gold}</answer>",
                           f"<think>reasoning</think><answer>{reply}</answer>",
                           ("A. red", "B. green", "C. blue", "D. cyan"))
    assert score_outcomes([sample]).reward[0] == float(correct)
