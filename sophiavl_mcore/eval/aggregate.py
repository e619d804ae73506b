"""Aggregates of per-sample scores: accuracy tables, MME's scores, MMBench's circular
accuracy, pass@k and majority voting. Every report is a plain, JSON-ready dict.

- :func:`accuracy_report`: ``{"overall": {"acc", "n"}, "category": {name: {"acc", "n"}},
  "l2_category": …, "skill": …}``; a MathVista sample counts once towards each of its
  ``skills`` (a list literal or a comma-separated string in ``extras``). Accuracies are
  means of the scores (so in [0, 1]; free-form scores may be fractional).
- :func:`mme_report`: as VLMEvalKit's ``MME_rating``: per category, ``acc`` = 100 · the
  mean score of its questions, ``acc_plus`` = 100 · the share of its images whose
  questions (two per image in MME) are all right, ``score`` = acc + acc_plus (max 200);
  questions are grouped by :attr:`EvalSample.image_key` (the ``image_path`` column, else
  the index of the row that holds the image: MME's second question refers to the first's).
  ``perception`` is the sum of the scores of the ten perception categories present,
  ``cognition`` of the four cognition ones (VLMEvalKit calls it "reasoning").
- :func:`circular_report`: MMBench's CircularEval — copies of a question with rotated
  options have indices ``i + k·1_000_000``; a question counts as right only when all of
  its copies are.
- :func:`pass_at_k`: the unbiased estimator 1 − C(n−c, k)/C(n, k) (Chen et al., 2021);
  :func:`mean_pass_at_k` averages it over questions.
- :func:`majority_vote`: the most frequent answer of n (ties: the earliest);
  :func:`majority_vote_accuracy` scores it per question.
"""

from __future__ import annotations

import ast
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sophiavl_mcore.eval.samples import EvalSample
from sophiavl_mcore.rewards.numeric import parse_plain_number

__all__ = [
    "MME_COGNITION", "MME_PERCEPTION", "accuracy_report", "answer_key", "circular_report",
    "group_means", "majority_vote", "majority_vote_accuracy", "mean_pass_at_k", "mme_report",
    "pass_at_k", "sample_skills",
]

MME_PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
    "artwork", "ocr",
)
MME_COGNITION: tuple[str, ...] = (
    "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning",
)
_CIRCULAR_STRIDE = 1_000_000


def _check(scores: Sequence[float], samples: Sequence[EvalSample]) -> None:
    if len(scores) != len(samples):
        raise ValueError(f"{len(scores)} scores for {len(samples)} samples")


def group_means(scores: Sequence[float], keys: Iterable[Iterable[str]]) -> dict[str, dict[str, Any]]:
    """``{key: {"acc": mean score, "n": count}}``; each score counts for each of its keys."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for score, names in zip(scores, keys, strict=True):
        for name in names:
            sums[name] += float(score)
            counts[name] += 1
    return {k: {"acc": sums[k] / counts[k], "n": counts[k]} for k in sorted(counts)}


def sample_skills(sample: EvalSample) -> list[str]:
    """MathVista's ``skills`` of a sample (a list literal or comma-separated), or []."""
    text = sample.extras.get("skills", "").strip()
    if not text:
        return []
    if text.startswith("["):
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            items = None
        if isinstance(items, (list, tuple)):
            return [str(s).strip() for s in items if str(s).strip()]
    return [s.strip().strip("'\"") for s in text.strip("[]").split(",") if s.strip().strip("'\"")]


def accuracy_report(scores: Sequence[float], samples: Sequence[EvalSample]) -> dict[str, Any]:
    """Overall accuracy and accuracy per category, l2-category and skill (non-empty ones)."""
    _check(scores, samples)
    n = len(scores)
    report: dict[str, Any] = {"overall": {"acc": sum(map(float, scores)) / n if n else 0.0, "n": n}}
    for name, keys in (
        ("category", [[s.category] if s.category else [] for s in samples]),
        ("l2_category", [[s.l2_category] if s.l2_category else [] for s in samples]),
        ("skill", [sample_skills(s) for s in samples]),
    ):
        table = group_means(scores, keys)
        if table:
            report[name] = table
    return report


def _mme_name(category: str) -> str:
    return re.sub(r"[\s\-]+", "_", category.strip().lower())


def mme_report(scores: Sequence[float], samples: Sequence[EvalSample]) -> dict[str, Any]:
    """MME's per-category acc / acc+ / score and the perception and cognition sums."""
    _check(scores, samples)
    by_image: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for score, sample in zip(scores, samples, strict=True):
        by_image[sample.category][sample.image_key].append(float(score))
    categories: dict[str, dict[str, float]] = {}
    for category in sorted(by_image):
        images = by_image[category].values()
        every = [s for group in images for s in group]
        acc = 100.0 * sum(every) / len(every)
        acc_plus = 100.0 * sum(float(all(s == 1.0 for s in g)) for g in images) / len(images)
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                                "questions": len(every), "images": len(images)}
    perception = sum(v["score"] for k, v in categories.items() if _mme_name(k) in MME_PERCEPTION)
    cognition = sum(v["score"] for k, v in categories.items() if _mme_name(k) in MME_COGNITION)
    other = sorted(k for k in categories if _mme_name(k) not in MME_PERCEPTION + MME_COGNITION)
    report = accuracy_report(scores, samples)
    report.update({"mme_category": categories, "perception": perception, "cognition": cognition,
                   "total": perception + cognition})
    if other:
        report["unknown_categories"] = other
    return report


def circular_report(scores: Sequence[float], samples: Sequence[EvalSample]) -> dict[str, Any]:
    """:func:`accuracy_report` plus MMBench's circular accuracy when copies are present."""
    report = accuracy_report(scores, samples)
    groups: dict[str, list[float]] = defaultdict(list)
    for score, sample in zip(scores, samples, strict=True):
        key = str(int(sample.index) % _CIRCULAR_STRIDE) if sample.index.isdigit() else sample.index
        groups[key].append(float(score))
    if any(len(g) > 1 for g in groups.values()):
        right = sum(float(all(s == 1.0 for s in g)) for g in groups.values())
        report["circular"] = {"acc": right / len(groups), "n": len(groups)}
    return report


# ------------------------------------------------------------------ several samples


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question with ``c`` right answers among ``n`` samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean pass@k over questions given as ``(n, c)`` pairs."""
    if not counts:
        raise ValueError("mean_pass_at_k needs at least one question")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def answer_key(answer: str) -> str:
    """What two answers share when they mean the same: the exact value of a plain number
    (``"0.50"`` and ``"1/2"`` agree), else the lower-cased, space-normalised text."""
    number = parse_plain_number(answer)
    if number is not None:
        return f"{number.value}{'%' if number.percent else ''}"
    return re.sub(r"\s+", " ", answer.strip().lower()).rstrip(".")


def majority_vote(answers: Sequence[str], key: Callable[[str], str] = answer_key) -> str:
    """The answer whose ``key`` is the most frequent (ties: the one seen first)."""
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    keys = [key(a) for a in answers]
    counts = Counter(keys)
    best = max(counts.values())
    winner = next(k for k in keys if counts[k] == best)
    return answers[keys.index(winner)]


def majority_vote_accuracy(answers: Sequence[Sequence[str]], samples: Sequence[EvalSample],
                           scorer: Callable[[str, EvalSample], float],
                           key: Callable[[str], str] = answer_key) -> float:
    """Mean score of the majority answer of each question (``answers[i]``: the extracted
    answers of ``samples[i]``'s n replies)."""
    _check(answers, samples)
    if not samples:
        raise ValueError("majority_vote_accuracy needs at least one question")
    return sum(scorer(majority_vote(a, key), s) for a, s in zip(answers, samples, strict=True)) / len(samples)
