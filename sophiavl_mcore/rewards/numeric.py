"""Numerical answer grading: an exact fast path for plain numbers, math-verify for the rest.

:func:`fast_numeric_verdict` decides exactly (with :class:`fractions.Fraction`) when both
the gold answer and the reply are a *plain number*, and returns None otherwise; the
caller then asks math-verify (:func:`math_verify_equal`, ~2 ms a call).

A plain number is, after peeling wrappers:

- wrappers (any order, up to four): ``$…$``, ``$$…$$``, ``\\(…\\)``, ``\\[…\\]``,
  ``\\boxed{…}``; a leading currency sign ``\\$``;
- a sign ``+``, ``-`` or ``−`` (U+2212), then one of
  - an integer or decimal: ``7``, ``-0.25``, ``.5``, ``3.``;
  - thousands separators in groups of exactly three: ``1,234,567.5``, ``1{,}000``
    (``1,5`` is not one: a decimal comma or a list, left to math-verify);
  - scientific notation: ``1.5e3``, ``2E-4``, ``2.5\\times10^{-4}``, ``3 \\cdot 10^5``,
    ``1.2×10^3`` (exponent magnitude at most 400);
  - a fraction ``3/4``, ``\\frac{3}{4}`` (``\\dfrac``, ``\\tfrac``; a sign in front or in
    the numerator), denominator not 0;
- then optionally ``%`` or ``\\%`` (a *percentage*; only after an integer or decimal:
  ``1/2%`` may mean (1/2)% or 1/(2%), ``1e3%`` is unusual — both go to math-verify);
- then optionally units, which are dropped, not compared: ``\\text{…}`` /
  ``\\mathrm{…}`` / ``\\mbox{…}``, degrees (``°``, ``^\\circ``), or up to three
  space-separated words of letters (``5 cm``, ``3 apples``, ``12 km/h``, ``4 m^2``) —
  except one-letter words other than the SI symbols m g s h L K N J W V A T, and words
  that change the value (``million``, ``pi``, ``percent``, ``times``, …), which leave
  the answer to math-verify.

Verdict: values equal ⇒ True. A percentage compared with a plain number matches its
number or its number/100 (``50%`` = ``0.5`` = ``50``); two percentages compare their
numbers (``3%`` ≠ ``300%``). Values that differ by less than 1e-4 relative (math-verify
rounds) are left to math-verify; further apart ⇒ False.

Intended divergences from math-verify (0.9) where the fast path decides. The fast
path is never more lenient than math-verify except in the first group; everything
else is math-verify scoring an *equal* pair 0. Checked by
``tests/unit/test_grading_issue17.py`` (``test_documented_divergences_from_math_verify``
and ``test_math_verify_never_accepts_what_the_independent_grader_rejects``):

- forms math-verify refuses, which are ordinary ways to write a number: scientific
  notation (``1.5e3`` = ``1500``, ``2.5\\times10^{-4}`` = ``0.00025``), LaTeX's
  thousands separator (``1{,}000``), a currency sign (``\\$3`` = ``3``), ``\\%`` for
  ``%`` (``50\\%`` = ``0.5``);
- decorations math-verify's parser loses in some combinations (seen in generated
  pairs): ``%`` inside ``$…$`` (a LaTeX comment character there), a ``+`` sign or a
  sign with thousands separators, units inside ``$…$`` / ``\\boxed{}``, compound units
  (``km/h``), a unit or degree sign after a fraction. The fast path reads the number;
  math-verify sometimes scores the equal answer 0;
- ``−\\frac{1}{3}`` ≠ ``1/3``: the Unicode minus sign (U+2212) negates; math-verify
  drops it in front of a LaTeX command and calls the two equal.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from fractions import Fraction

logger = logging.getLogger(__name__)

_SIGN = r"[+\-\u2212]"
_DECIMAL = r"(?:\d+(?:\.\d*)?|\.\d+)"
_GROUPED = r"(?:\d{1,3}(?:(?:,|\{,\})\d{3})+(?:\.\d*)?)"
_EXPONENT = rf"(?:\{{\s*{_SIGN}?\s*\d+\s*\}}|{_SIGN}?\d+)"
_NUMBER_RE = re.compile(
    rf"^(?P<sign>{_SIGN})?\s*(?P<mant>{_GROUPED}|{_DECIMAL})"
    rf"(?:[eE](?P<e>{_SIGN}?\d+)|\s*(?:\\times|\\cdot|×|\*)\s*10\s*\^\s*(?P<p>{_EXPONENT}))?$"
)
_FRACTION_RE = re.compile(rf"^(?P<sign>{_SIGN})?\s*(?P<num>{_SIGN}?\d+)\s*/\s*(?P<den>\d+)$")
_LATEX_FRAC_RE = re.compile(
    rf"^(?P<sign>{_SIGN})?\s*\\[dt]?frac\s*\{{\s*(?P<num>{_SIGN}?\d+)\s*\}}\s*\{{\s*(?P<den>\d+)\s*\}}$"
)
_BOXED_RE = re.compile(r"^\\boxed\s*\{(.*)\}$", re.DOTALL)
_TEXT_UNIT_RE = re.compile(
    r"(?:\\[,;:! ]|~)?\s*\\(?:text|mathrm|textrm|mbox|rm)\s*\{\s*[A-Za-z°²³ ./^{}0-9]*\}$")
_DEGREE_RE = re.compile(r"\s*(?:°|\^\s*\{?\s*\\circ\s*\}?)$")
_WORD_UNIT_RE = re.compile(r"\s+(?P<w>[A-Za-z]+(?:/[A-Za-z]+)?)(?:[²³]|\^\{?\d\}?)?$")
_SI_LETTERS = frozenset("mgshLKNJWVAT")
# Words after a number that change its value or make it an expression: not units.
_VALUE_WORDS = frozenset({
    "hundred", "thousand", "million", "billion", "trillion", "dozen", "percent", "percentage",
    "half", "halves", "third", "thirds", "quarter", "quarters", "squared", "cubed", "over",
    "times", "plus", "minus", "or", "and", "to", "of", "pi", "sqrt", "root", "ln", "log", "exp",
    "sin", "cos", "tan", "inf", "infty", "infinity", "power", "i", "e", "x", "y", "z", "n",
})
_MAX_EXPONENT = 400
_MAX_CHARS = 200
# Below this relative gap two numbers are "near": math-verify's rounding (6 digits) can
# call them equal, so the fast path defers to it.
_NEAR_RELATIVE_GAP = 1e-4


@dataclass(frozen=True)
class PlainNumber:
    """The exact value of a plain number and whether it was written as a percentage."""

    value: Fraction
    percent: bool


def _peel(s: str) -> str:
    """Strip ``$…$``, ``\\(…\\)``, ``\\[…\\]``, ``\\boxed{…}`` and a leading ``\\$``."""
    for _ in range(4):
        s = s.strip()
        boxed = _BOXED_RE.match(s)
        if boxed:
            s = boxed[1]
        elif len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$")
        elif s[:2] in ("\\(", "\\[") and s[-2:] in ("\\)", "\\]"):
            s = s[2:-2]
        elif s.startswith("\\$"):
            s = s[2:]
        else:
            break
    return s.strip()


def _strip_units(s: str) -> str | None:
    """``s`` without trailing units; None when a trailing word is not a unit."""
    for _ in range(3):
        for pattern in (_TEXT_UNIT_RE, _DEGREE_RE):
            m = pattern.search(s)
            if m:
                s = s[:m.start()].rstrip()
                break
        else:
            m = _WORD_UNIT_RE.search(s)
            if m is None:
                return s
            word = m["w"]
            parts = word.lower().split("/")
            if any(p in _VALUE_WORDS for p in parts) or (len(word) == 1 and word not in _SI_LETTERS):
                return None
            s = s[:m.start()].rstrip()
    return s


def _exponent(text: str) -> int:
    return int(text.strip("{} ").replace(" ", "").replace("\u2212", "-"))


def parse_plain_number(text: str) -> PlainNumber | None:
    """The value of a plain number (see the module docstring), or None."""
    if len(text) > _MAX_CHARS:
        return None
    s = _peel(text)
    percent = s.endswith("%")
    if percent:
        s = _peel(s[:-1].rstrip().removesuffix("\\"))
    else:
        stripped = _strip_units(s)
        if stripped is None:
            return None
        s = _peel(stripped)
    m = _NUMBER_RE.match(s)
    if m:
        exp_text = m["e"] or m["p"]
        exponent = _exponent(exp_text) if exp_text else 0
        if abs(exponent) > _MAX_EXPONENT or (percent and exp_text):
            return None
        value = Fraction(m["mant"].replace("{,}", "").replace(",", "")) * Fraction(10) ** exponent
    else:
        m = _FRACTION_RE.match(s) or _LATEX_FRAC_RE.match(s)
        # "1/2%" could be (1/2)% or 1/(2%): left to math-verify.
        if m is None or int(m["den"]) == 0 or percent:
            return None
        value = Fraction(int(m["num"].replace("\u2212", "-")), int(m["den"]))
    if m["sign"] in ("-", "\u2212"):
        value = -value
    return PlainNumber(value, percent)


def _far_apart(a: Fraction, b: Fraction) -> bool:
    scale = max(abs(a), abs(b), Fraction(1))
    return abs(a - b) > scale * Fraction(_NEAR_RELATIVE_GAP)


def fast_numeric_verdict(gold: str, answer: str) -> bool | None:
    """True/False when both sides are plain numbers and the verdict is certain, else None.

    A percentage against a plain number matches its number or its number/100; two
    percentages compare their numbers.
    """
    g, a = parse_plain_number(gold), parse_plain_number(answer)
    if g is None or a is None:
        return None
    pairs = [(g.value, a.value)]
    if g.percent and not a.percent:
        pairs.append((g.value / 100, a.value))
    elif a.percent and not g.percent:
        pairs.append((g.value, a.value / 100))
    if any(x == y for x, y in pairs):
        return True
    if all(_far_apart(x, y) for x, y in pairs):
        return False
    return None


def math_verify_equal(gold: str, answer: str) -> bool:
    """math-verify's verdict; any parser failure or timeout counts as not equal."""
    from math_verify import parse, verify  # import costs ~1 s: only when a slow case occurs

    try:
        gold_parsed = _parse_math(parse, gold)
        answer_parsed = _parse_math(parse, answer)
        if not gold_parsed or not answer_parsed:
            return False
        return bool(verify(gold_parsed, answer_parsed))
    except Exception as err:  # math-verify raises assorted sympy errors on odd input
        logger.debug("math-verify failed on %r vs %r: %s", gold, answer, err)
        return False


def _parse_math(parse, text: str) -> list:
    # math-verify only finds LaTeX inside delimiters ($…$, \boxed{}); an answer field is
    # bare LaTeX like "\sqrt{2}", so retry inside $…$ when the plain parse finds nothing.
    parsed = parse(text)
    if not parsed and "$" not in text:
        parsed = parse(f"${text}$")
    return parsed
