"""Rule-based outcome rewards R^o for the SophiaVL-R1 problem types.

A response must follow ``<think>…</think><answer>…</answer>``; anything else scores 0
(the *format gate*). Inside the gate, the answer is graded by problem type:

- ``numerical``: binary. Plain numbers (integers, decimals, thousands separators,
  fractions, ``\\frac``, percentages, scientific notation, with ``$``/``\\boxed{}``
  and units tolerated) are compared exactly (:mod:`sophiavl_mcore.rewards.numeric`,
  whose docstring lists the rules and the intended divergences from math-verify);
  everything else (and near-ties, where math-verify's rounding decides) goes to
  math-verify's equivalence check. :class:`OutcomeStats` counts the slow-path share.
- ``multiple choice``: the set of option letters the reply commits to must equal the
  gold set (rules in :func:`option_letters`: "B", "(B)", "**B**", "B, D", "B) text",
  an option's own text, "C is correct", "I think the answer is B.").
- ``OCR``: exp(−WER) on whitespace-separated words (C++ batch kernel).
- ``free-form``: mean of ROUGE-1, ROUGE-2 and ROUGE-L F with Porter stemming, equal to
  the ``rouge-score`` package's numbers (C++ batch kernel). The released SophiaVL-R1
  data's ``text`` type is read as ``free-form`` (:data:`PROBLEM_TYPE_ALIASES`).

An optional separate format reward (``format_weight``, off by default) adds
``format_weight · well_formed`` on top of the gated accuracy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sophiavl_mcore.data.schema import (
    PROBLEM_TYPE_ALIASES,
    PROBLEM_TYPES,
    ParsedResponse,
    ProblemTypeError,
    check_problem_type,
    parse_response,
)
from sophiavl_mcore.rewards.numeric import fast_numeric_verdict, math_verify_equal
from sophiavl_mcore.rewards.text_metrics import batch_rouge, batch_wer

__all__ = [
    "PROBLEM_TYPES", "PROBLEM_TYPE_ALIASES", "OutcomeSample", "OutcomeScores", "OutcomeStats",
    "ParsedResponse", "ProblemTypeError", "check_problem_type", "fast_numeric_verdict",
    "math_verify_equal", "ocr_reward", "option_letters", "parse_response", "score_outcomes",
    "solution_answer",
]

_SOLUTION_RE = re.compile(r"<answer>(?P<answer>.*?)</answer>", re.DOTALL)


def solution_answer(solution: str) -> str:
    """The gold answer: the text inside ``<answer>…</answer>`` or the whole string."""
    match = _SOLUTION_RE.search(solution)
    return (match["answer"] if match else solution).strip()


# ---------------------------------------------------------------- multiple choice

_OPTION_TOKEN_RE = re.compile(r"^[(\[]?([A-Za-z])[)\]]?[.:)]?$")
_LEADING_OPTION_RE = re.compile(r"^[(\[]?([A-Za-z])[.:)\]]\s+\S")
_OPTION_PREFIX_RE = re.compile(
    r"^(the\s+)?(final\s+)?(correct\s+)?(answer|option|choice)s?\s*(is|are|:)?\s*", re.I)
_LETTER_LIST = r"[(\[]?[A-Z][)\]]?(?:\s*(?:,|/|&|\band\b|\bor\b)\s*[(\[]?[A-Z][)\]]?)*"
# Phrases that commit to option letters; keywords in any case, letters upper case
# (a lower-case "a" in running text is an article). "X is correct" only counts at the
# start of a clause or after "think/so/…" ("Between A and B, A is correct" names A).
_COMMIT_RES = (
    re.compile(r"(?i:\b(?:answer|option|choice)s?\b\s*(?:is|are|would\s+be|should\s+be|"
               r"must\s+be)?\s*[:=]?\s*(?:option\s+|choice\s+)?)(?P<l>" + _LETTER_LIST + r")(?![\w'])"),
    re.compile(r"(?:^|[.;:!?,]\s*|(?i:\b(?:think|believe|guess|so|thus|hence|therefore|then|"
               r"clearly)\s+))(?P<l>" + _LETTER_LIST + r")\s+(?i:(?:is|are)\s+(?:the\s+)?"
               r"(?:correct|right|best|true|answer))"),
    re.compile(r"(?i:\b(?:choose|chose|pick|select|go\s+with)\s+(?:option\s+|choice\s+)?)"
               r"(?P<l>" + _LETTER_LIST + r")(?![\w'])"),
)
# Letters rule 5 accepts when the options are unknown ("I" is far more often a pronoun).
_FREE_TEXT_LETTERS = "ABCDEFGH"
_MARKUP_RE = re.compile(r"\*\*|__|`|\$")
_LATEX_WRAP_RE = re.compile(r"\\(?:boxed|text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def _strip_markup(text: str) -> str:
    """Remove markdown emphasis, backticks, ``$`` and ``\\boxed{}``-style wrappers."""
    text = _LATEX_WRAP_RE.sub(r"\1", text)
    text = _MARKUP_RE.sub("", text)
    return re.sub(r"(?<![A-Za-z])\*([A-Za-z])\*(?![A-Za-z])", r"\1", text).strip()


def _letter_list(text: str) -> frozenset[str] | None:
    """Letters of a bare list ("B", "(B)", "B, D", "D and B"); None if ``text`` is not one."""
    tokens = [t for t in re.split(r"\s*(?:,|;|/|&|\band\b|\s)\s*", text) if t]
    letters = [_OPTION_TOKEN_RE.match(t) for t in tokens]
    if tokens and all(letters):
        return frozenset(m[1].upper() for m in letters if m)
    return None


def _committed_letters(text: str, allowed: str) -> frozenset[str]:
    """Letters (among ``allowed``) named by commitment phrases; empty when there are none,
    or when they disagree or offer alternatives ("B or C")."""
    found: set[frozenset[str]] = set()
    for pattern in _COMMIT_RES:
        for m in pattern.finditer(text):
            letters = frozenset(re.findall(r"[A-Z]", m["l"]))
            if not letters <= set(allowed):
                continue  # "the answer I chose": a pronoun, not an option
            if re.search(r"\bor\b", m["l"]):
                return frozenset()
            found.add(letters)
    return next(iter(found)) if len(found) == 1 else frozenset()


def option_letters(answer: str, options: Sequence[str] = ()) -> frozenset[str]:
    """The set of option letters an answer commits to (upper case); empty if none is clear.

    Rules, first match wins (markdown ``**``/``__``/backticks, ``$`` and
    ``\\boxed{}``/``\\text{}`` are removed first, then a trailing period):

    1. a bare letter list: "B", "(B)", "[B]", "B.", "b", "B, D", "B and D";
    2. the same after "Answer:", "The (final) (correct) answer is", "Option";
    3. a leading option label: "B) the triangle", "B. green", "(B) green";
    4. the full text of one of ``options`` ("A. text" or plain "text");
    5. commitment phrases anywhere in the text — "answer/option/choice (is|:|would be)
       X", "X is (the) correct/right/best/answer", "I choose/pick/select/go with X" —
       when all of them name the same letter set; phrases that disagree, or offer
       alternatives ("B or C"), commit to nothing. Only option labels count here
       (A–H when ``options`` is empty).

    A reply naming two letters where one is expected therefore yields a two-letter set
    (rule 1) or nothing, and never equals a one-letter gold answer.
    """
    text = _strip_markup(answer).rstrip(".!")
    if not text:
        return frozenset()
    for candidate in (text, _OPTION_PREFIX_RE.sub("", text).strip().rstrip(".!")):
        letters = _letter_list(candidate)
        if letters is not None:
            return letters
    leading = _LEADING_OPTION_RE.match(_OPTION_PREFIX_RE.sub("", text).strip())
    if leading:
        return frozenset({leading[1].upper()})
    normalized = _normalize_option_text(text)
    labels = []
    for index, option in enumerate(options):
        label = chr(ord("A") + index)
        option_match = _LEADING_OPTION_RE.match(option.strip())
        if option_match:
            label = option_match[1].upper()
        labels.append(label)
        if normalized in {_normalize_option_text(option), _normalize_option_text(option[2:])}:
            return frozenset({label})
    return _committed_letters(text, "".join(labels) or _FREE_TEXT_LETTERS)


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
        problem_type = check_problem_type(sample.problem_type, f"sample {index}")
        stats.per_type_count[problem_type] = stats.per_type_count.get(problem_type, 0) + 1
        parsed = parse_response(sample.response)
        well_formed[index] = parsed.well_formed
        if not parsed.well_formed:
            stats.malformed += 1
            continue
        gold = solution_answer(sample.solution)
        if problem_type == "numerical":
            accuracy[index] = _grade_numerical(gold, parsed.answer, stats)
        elif problem_type == "multiple choice":
            gold_letters = option_letters(gold, sample.options)
            accuracy[index] = float(bool(gold_letters) and gold_letters == option_letters(parsed.answer, sample.options))
        else:
            indices, references, hypotheses = text_jobs[problem_type]
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
