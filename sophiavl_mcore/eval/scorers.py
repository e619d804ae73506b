"""Deterministic scorers: ``(extracted answer, sample) -> float in [0, 1]``.

- :func:`score_multiple_choice`: the letters the answer commits to
  (``rewards.outcome.option_letters``: "B", "(B)", "The answer is B.", an option's exact
  text, …) must equal the gold letters. The gold is the ``answer`` field as a letter, or
  the one option whose text it is (MathVista stores the option text). Two letters
  against one gold letter score 0.
- :func:`score_numeric`: MathVista's ``answer_type`` / ``precision`` rules —
  ``integer``: the value must equal the gold integer (``3.0`` = ``3``; MathVista's
  official ``int(float(x))`` would also accept ``3.7``, this does not); ``float`` with a
  ``precision`` p: both values rounded half-up to p decimals must be equal (exact
  decimal arithmetic, no float error); ``text`` / ``list``: exact after normalisation
  (:func:`normalize_text`); no answer_type (or float without precision): the project's
  numeric grader (``rewards.numeric``: exact fast path, math-verify for the rest), then
  normalised text equality.
- :func:`score_relaxed`: ChartQA's relaxed accuracy — numbers (``%`` stripped from both
  sides, thousands separators allowed) within 5 % relative of the gold (inclusive; a gold
  of 0 needs exactly 0), else exact case-insensitive text.
- :func:`score_yes_no`: MME — the answer says "yes" (and not "no") or "no" (and not
  "yes") as a word, case-insensitively, as VLMEvalKit's YOrN extraction; it must match
  the gold. Anything else scores 0.
- :func:`score_free_form`: mean of ROUGE-1/2/L F (``rewards.text_metrics.batch_rouge``).
- :func:`score_ocr`: exp(−WER), the training reward of OCR records.
- :func:`score_exact`: normalised text equality.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

from sophiavl_mcore.eval.samples import EvalSample
from sophiavl_mcore.rewards.numeric import (
    fast_numeric_verdict,
    math_verify_equal,
    parse_plain_number,
)
from sophiavl_mcore.rewards.outcome import ocr_reward, option_letters
from sophiavl_mcore.rewards.text_metrics import batch_rouge

__all__ = [
    "Scorer", "gold_letters", "normalize_text", "score_exact", "score_free_form",
    "score_multiple_choice", "score_numeric", "score_ocr", "score_relaxed", "score_yes_no",
    "yes_no",
]

Scorer = Callable[[str, EvalSample], float]

_RELAXED_TOLERANCE = Fraction(5, 100)


def normalize_text(text: str) -> str:
    """Lower case, whitespace runs to one space, surrounding quotes and a final period
    removed."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip("\"'").rstrip(".").strip()


def score_exact(answer: str, sample: EvalSample) -> float:
    return float(normalize_text(answer) == normalize_text(sample.answer))


# ------------------------------------------------------------------ multiple choice


def gold_letters(sample: EvalSample) -> frozenset[str]:
    """The gold option letters: the answer as letters ("B", "(B)"), else the letter of the
    one option whose text equals the answer."""
    options = sample.option_list()
    letters = option_letters(sample.answer, options)
    if letters and (not sample.options or letters <= set(sample.options)):
        return letters
    target = normalize_text(sample.answer)
    matches = [k for k, v in sample.options.items() if normalize_text(v) == target]
    return frozenset(matches) if len(matches) == 1 else frozenset()


def score_multiple_choice(answer: str, sample: EvalSample) -> float:
    gold = gold_letters(sample)
    return float(bool(gold) and option_letters(answer, sample.option_list()) == gold)


# ------------------------------------------------------------------ numeric


def _value(text: str) -> Fraction | None:
    number = parse_plain_number(text)
    return number.value if number is not None else None


def _round(value: Fraction, places: int) -> Decimal:
    exact = Decimal(value.numerator) / Decimal(value.denominator)
    return exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)


def _precision(sample: EvalSample) -> int | None:
    text = sample.extras.get("precision", "")
    try:
        places = float(text)
    except ValueError:
        return None
    return int(places) if math.isfinite(places) and places >= 0 else None


def _numbers_equal(answer: str, gold: str) -> bool:
    verdict = fast_numeric_verdict(gold, answer)
    if verdict is None:
        verdict = math_verify_equal(gold, answer) or normalize_text(answer) == normalize_text(gold)
    return verdict


def score_numeric(answer: str, sample: EvalSample) -> float:
    answer_type = sample.extras.get("answer_type", "")
    if answer_type in ("text", "list"):
        return score_exact(answer, sample)
    gold, pred = _value(sample.answer), _value(answer)
    if answer_type == "integer":
        return float(gold is not None and pred is not None and gold == pred and gold.denominator == 1)
    places = _precision(sample)
    if answer_type == "float" and places is not None:
        return float(gold is not None and pred is not None and _round(gold, places) == _round(pred, places))
    return float(_numbers_equal(answer, sample.answer))


# ------------------------------------------------------------------ ChartQA


def _relaxed_value(text: str) -> Fraction | None:
    return _value(text.strip().removesuffix("%").removesuffix("\\").strip())


def score_relaxed(answer: str, sample: EvalSample) -> float:
    gold, pred = _relaxed_value(sample.answer), _relaxed_value(answer)
    if gold is not None and pred is not None:
        if gold == 0:
            return float(pred == 0)
        return float(abs(pred - gold) / abs(gold) <= _RELAXED_TOLERANCE)
    return float(answer.strip().lower() == sample.answer.strip().lower())


# ------------------------------------------------------------------ yes / no, text


def yes_no(text: str) -> str | None:
    """"yes" or "no" when the text says exactly one of them as a word, else None."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    if ("yes" in words) != ("no" in words):
        return "yes" if "yes" in words else "no"
    return None


def score_yes_no(answer: str, sample: EvalSample) -> float:
    said = yes_no(answer)
    return float(said is not None and said == yes_no(sample.answer))


def score_free_form(answer: str, sample: EvalSample) -> float:
    return float(batch_rouge([sample.answer], [answer]).mean(axis=1)[0])


def score_ocr(answer: str, sample: EvalSample) -> float:
    return ocr_reward(sample.answer, answer)
