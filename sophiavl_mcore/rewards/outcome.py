"""Rule-based outcome rewards R^o for the SophiaVL-R1 problem types.

A response must follow ``<think>…</think><answer>…</answer>``; anything else scores 0
(the *format gate*). Inside the gate, the answer is graded by problem type:

- ``numerical``: mathematical equivalence as math-verify decides it (0.5 = 1/2 =
  \\frac{1}{2}, units, ``$`` and ``\\boxed{}`` tolerated), binary. math-verify costs about
  2 ms a call, so plain numbers, fractions and percentages take an exact fast path whose
  verdicts agree with math-verify; only the rest (and near-ties, where math-verify's
  rounding decides) go to math-verify. :class:`OutcomeStats` counts the slow-path share.
- ``multiple choice``: the set of option letters must match ("B", "(B)", "B.", "B) text",
  "b", "B, D" and an option's own text are understood).
- ``OCR``: exp(−WER) on whitespace-separated words (C++ batch kernel).
- ``free-form``: mean of ROUGE-1, ROUGE-2 and ROUGE-L F with Porter stemming, equal to
  the ``rouge-score`` package's numbers (C++ batch kernel).

An optional separate format reward (``format_weight``, off by default) adds
``format_weight · well_formed`` on top of the gated accuracy.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from sophiavl_mcore.rewards.text_metrics import batch_rouge, batch_wer

logger = logging.getLogger(__name__)

PROBLEM_TYPES: tuple[str, ...] = ("numerical", "multiple choice", "OCR", "free-form")

_RESPONSE_RE = re.compile(
    r"^\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*$", re.DOTALL
)
_SOLUTION_RE = re.compile(r"<answer>(?P<answer>.*?)</answer>", re.DOTALL)


class ProblemTypeError(ValueError):
    """A record names a problem_type the reward functions do not know."""


def check_problem_type(problem_type: object, where: str) -> str:
    """Return ``problem_type`` if it is one of :data:`PROBLEM_TYPES`, else raise.

    ``where`` names the record (file and record id) so that the error points at the data.
    """
    if not isinstance(problem_type, str) or problem_type not in PROBLEM_TYPES:
        raise ProblemTypeError(
            f"{where}: field 'problem_type' is {problem_type!r}; expected one of "
            f"{', '.join(repr(p) for p in PROBLEM_TYPES)}"
        )
    return problem_type


@dataclass(frozen=True)
class ParsedResponse:
    """A response split into its reasoning and answer; ``well_formed`` is the format gate."""

    think: str
    answer: str
    well_formed: bool


def parse_response(text: str) -> ParsedResponse:
    """Split ``<think>…</think><answer>…</answer>``; exactly one of each, in that order."""
    match = _RESPONSE_RE.match(text)
    if match is None or "<think>" in match["think"] or "<answer>" in match["answer"]:
        return ParsedResponse(think="", answer="", well_formed=False)
    return ParsedResponse(match["think"].strip(), match["answer"].strip(), True)


def solution_answer(solution: str) -> str:
    """The gold answer: the text inside ``<answer>…</answer>`` or the whole string."""
    match = _SOLUTION_RE.search(solution)
    return (match["answer"] if match else solution).strip()


# ---------------------------------------------------------------- numerical answers

_NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_FRACTION_RE = re.compile(r"^([+-]?\d+)\s*/\s*(\d+)$")
_LATEX_FRAC_RE = re.compile(r"^([+-]?)\\[dt]?frac\{\s*(\d+)\s*\}\{\s*(\d+)\s*\}$")
_BOXED_RE = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)

# Below this relative gap two numbers are "near": math-verify's rounding (6 digits) can
# call them equal, so the fast path defers to it.
_NEAR_RELATIVE_GAP = 1e-4


@dataclass(frozen=True)
class _PlainNumber:
    value: Fraction
    percent: bool


def _plain_number(text: str) -> _PlainNumber | None:
    """Parse a plain number/fraction/percentage, or None when it needs math-verify."""
    s = text.strip()
    for _ in range(3):  # peel $…$, \boxed{…}, \(…\) wrappers in any order
        boxed = _BOXED_RE.match(s)
        if boxed:
            s = boxed[1].strip()
        elif len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$").strip()
        elif s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2].strip()
    percent = s.endswith("%")
    if percent:
        s = s[:-1].rstrip().removesuffix("\\")
    try:
        if _NUMBER_RE.match(s):
            return _PlainNumber(Fraction(s), percent)
        frac = _FRACTION_RE.match(s) or None
        if frac and int(frac[2]) != 0:
            return _PlainNumber(Fraction(int(frac[1]), int(frac[2])), percent)
        latex = _LATEX_FRAC_RE.match(s)
        if latex and int(latex[3]) != 0:
            value = Fraction(int(latex[2]), int(latex[3]))
            return _PlainNumber(-value if latex[1] == "-" else value, percent)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _far_apart(a: Fraction, b: Fraction) -> bool:
    scale = max(abs(a), abs(b), Fraction(1))
    return abs(a - b) > scale * Fraction(_NEAR_RELATIVE_GAP)


def fast_numeric_verdict(gold: str, answer: str) -> bool | None:
    """True/False when both sides are plain numbers and the verdict is certain, else None.

    A percentage matches both its number and its number/100, as math-verify does.
    """
    g, a = _plain_number(gold), _plain_number(answer)
    if g is None or a is None:
        return None
    gold_values = {g.value, g.value / 100} if g.percent else {g.value}
    answer_values = {a.value, a.value / 100} if a.percent else {a.value}
    if gold_values & answer_values:
        return True
    if all(_far_apart(x, y) for x in gold_values for y in answer_values):
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


# ---------------------------------------------------------------- multiple choice

_OPTION_TOKEN_RE = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
_LEADING_OPTION_RE = re.compile(r"^\(?([A-Za-z])[.:)]\s+\S")
_OPTION_PREFIX_RE = re.compile(r"^(the\s+)?(correct\s+)?(answer|option|choice)s?\s*(is|are|:)?\s*", re.I)


def option_letters(answer: str, options: Sequence[str] = ()) -> frozenset[str]:
    """The set of option letters an answer names (upper case); empty if none is clear.

    Understands "B", "(B)", "B.", "b", "B, D", "B and D", "B) some text", "Answer: B", and
    the full text of one of ``options`` (options may be "A. text" or plain "text").
    """
    text = _OPTION_PREFIX_RE.sub("", answer.strip()).strip().rstrip(".")
    if not text:
        return frozenset()
    tokens = [t for t in re.split(r"\s*(?:,|;|/|&|\band\b|\s)\s*", text) if t]
    letters = [_OPTION_TOKEN_RE.match(t) for t in tokens]
    if tokens and all(letters):
        return frozenset(m[1].upper() for m in letters if m)
    leading = _LEADING_OPTION_RE.match(text)
    if leading:
        return frozenset({leading[1].upper()})
    normalized = _normalize_option_text(text)
    for index, option in enumerate(options):
        label = chr(ord("A") + index)
        option_match = _LEADING_OPTION_RE.match(option.strip())
        if option_match:
            label = option_match[1].upper()
        if normalized in {_normalize_option_text(option), _normalize_option_text(option[2:])}:
            return frozenset({label})
    return frozenset()


def _normalize_option_text(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower().rstrip("."))


# ---------------------------------------------------------------- batch API


@dataclass(frozen=True)
class OutcomeSample:
    """One response to grade. ``options`` only matters for multiple choice."""

    problem_type: str
    solution: str
    response: str
    options: tuple[str, ...] = ()


@dataclass
class OutcomeStats:
    """Counters of one :func:`score_outcomes` call (exported as ``reward/`` metrics)."""

    total: int = 0
    malformed: int = 0
    numerical_total: int = 0
    numerical_slow_path: int = 0
    per_type_count: dict[str, int] = field(default_factory=dict)

    @property
    def slow_path_fraction(self) -> float:
        """Share of numerical answers that needed math-verify."""
        return self.numerical_slow_path / self.numerical_total if self.numerical_total else 0.0


@dataclass
class OutcomeScores:
    """Per-sample arrays, all of shape [N]; ``reward`` is R^o, the others explain it."""

    reward: np.ndarray
    accuracy: np.ndarray
    well_formed: np.ndarray
    stats: OutcomeStats


def score_outcomes(samples: Sequence[OutcomeSample], format_weight: float = 0.0) -> OutcomeScores:
    """Grade a batch of responses; text metrics run in one C++ call per type.

    Returns R^o = accuracy·well_formed + format_weight·well_formed, each in [0, 1+w].
    """
    if format_weight < 0:
        raise ValueError(f"format_weight is {format_weight}; expected >= 0")
    n = len(samples)
    accuracy = np.zeros(n, dtype=np.float64)
    well_formed = np.zeros(n, dtype=np.bool_)
    stats = OutcomeStats(total=n)
    text_jobs: dict[str, tuple[list[int], list[str], list[str]]] = {
        "OCR": ([], [], []),
        "free-form": ([], [], []),
    }
    for index, sample in enumerate(samples):
        check_problem_type(sample.problem_type, f"sample {index}")
        stats.per_type_count[sample.problem_type] = stats.per_type_count.get(sample.problem_type, 0) + 1
        parsed = parse_response(sample.response)
        well_formed[index] = parsed.well_formed
        if not parsed.well_formed:
            stats.malformed += 1
            continue
        gold = solution_answer(sample.solution)
        if sample.problem_type == "numerical":
            accuracy[index] = _grade_numerical(gold, parsed.answer, stats)
        elif sample.problem_type == "multiple choice":
            gold_letters = option_letters(gold, sample.options)
            accuracy[index] = float(bool(gold_letters) and gold_letters == option_letters(parsed.answer, sample.options))
        else:
            indices, references, hypotheses = text_jobs[sample.problem_type]
            indices.append(index)
            references.append(gold)
            hypotheses.append(parsed.answer)
    ocr_indices, ocr_refs, ocr_hyps = text_jobs["OCR"]
    if ocr_indices:
        accuracy[ocr_indices] = np.exp(-batch_wer(ocr_refs, ocr_hyps))
    ff_indices, ff_refs, ff_hyps = text_jobs["free-form"]
    if ff_indices:
        accuracy[ff_indices] = batch_rouge(ff_refs, ff_hyps).mean(axis=1)
    reward = accuracy * well_formed + format_weight * well_formed
    return OutcomeScores(reward=reward, accuracy=accuracy, well_formed=well_formed, stats=stats)


def _grade_numerical(gold: str, answer: str, stats: OutcomeStats) -> float:
    stats.numerical_total += 1
    verdict = fast_numeric_verdict(gold, answer)
    if verdict is None:
        stats.numerical_slow_path += 1
        verdict = math_verify_equal(gold, answer)
    return float(verdict)


def ocr_reward(reference: str, hypothesis: str) -> float:
    """exp(−WER) for one pair (convenience; batches should use :func:`score_outcomes`)."""
    return math.exp(-float(batch_wer([reference], [hypothesis])[0]))
