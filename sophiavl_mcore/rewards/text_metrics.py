"""Batched text metrics for outcome rewards (Python API over ``_C``).

- :func:`batch_wer`: word error rate, jiwer 4.0 default semantics (case-sensitive;
  words separated by ' ' or by runs of >= 2 whitespace characters after stripping, so a
  single tab/newline between two words does *not* split them, exactly as jiwer).
  WER = word Levenshtein distance / max(len(reference words), 1); an empty reference
  gives the number of hypothesis words (jiwer 4.0 returns the same).
- :func:`batch_rouge`: F-measures of ROUGE-1, ROUGE-2, ROUGE-L equal to
  ``rouge_score.rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'],
  use_stemmer=True).score(target=reference, prediction=hypothesis)``, including its
  tokenizer (Python ``str.lower()``, [a-z0-9] runs, NLTK Porter stems of words longer than
  3 characters). Any Python str is accepted (non-ASCII characters are separators, except
  U+212A and U+0130, whose lowercase forms contain 'k' / 'i', as in Python).

The C++ kernels release the GIL and run pairs in parallel with OpenMP.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from sophiavl_mcore import _C

__all__ = [
    "batch_rouge",
    "batch_wer",
    "batch_wer_counts",
    "porter_stem",
    "rouge_tokenize",
]

logger = logging.getLogger(__name__)


def _as_str_list(texts: Sequence[str], name: str) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of str, not a single {type(texts).__name__}")
    try:
        items = list(texts)
    except TypeError as exc:
        raise ValueError(f"{name} must be a sequence of str, got {type(texts).__name__}") from exc
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"{name}[{i}] is {type(item).__name__}; expected str")
    return items


def _pairs(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[list[str], list[str]]:
    refs = _as_str_list(references, "references")
    hyps = _as_str_list(hypotheses, "hypotheses")
    if len(refs) != len(hyps):
        raise ValueError(
            f"references and hypotheses must have the same length, got {len(refs)} and {len(hyps)}"
        )
    return refs, hyps


def batch_wer(references: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
    """Word error rate of each pair, f64[N] (0 = perfect; can exceed 1)."""
    refs, hyps = _pairs(references, hypotheses)
    return _C.batch_wer(refs, hyps)


def batch_wer_counts(references: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
    """i64[N, 2]: per pair [word edit distance (S + D + I), reference word count]."""
    refs, hyps = _pairs(references, hypotheses)
    return _C.batch_wer_counts(refs, hyps)


def batch_rouge(references: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
    """f64[N, 3]: F-measures of ROUGE-1, ROUGE-2, ROUGE-L of each hypothesis against
    its reference (rouge-score semantics, use_stemmer=True)."""
    refs, hyps = _pairs(references, hypotheses)
    return _C.batch_rouge(refs, hyps)


def rouge_tokenize(texts: Sequence[str]) -> list[list[str]]:
    """rouge-score's default (stemmed) tokens of each text."""
    return _C.rouge_tokenize(_as_str_list(texts, "texts"))


def porter_stem(words: Sequence[str]) -> list[str]:
    """NLTK Porter stems (NLTK_EXTENSIONS mode) of ASCII words."""
    return _C.porter_stem(_as_str_list(words, "words"))
