"""Test oracles: pure Python / numpy versions of the C++ kernels in ``sophiavl_mcore._C``.

They are slow and simple on purpose: tests compare every C++ op against them. Each one
takes the same inputs as its ``_C`` counterpart and returns the same outputs.

- :func:`trust_grpo_oracle` ⇔ ``_C.trust_grpo``
- :func:`group_advantages_oracle` ⇔ ``_C.group_advantages``
- :func:`wer_oracle` ⇔ one entry of ``_C.batch_wer``
- :func:`rouge_oracle` ⇔ one row of ``_C.batch_rouge``
"""

from __future__ import annotations

import collections
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "group_advantages_oracle",
    "jiwer_words_oracle",
    "rouge_oracle",
    "rouge_tokens_oracle",
    "trust_grpo_oracle",
    "wer_oracle",
]


def trust_grpo_oracle(
    outcome: np.ndarray,
    thinking: np.ndarray,
    group_ids: np.ndarray,
    num_groups: int,
    *,
    correct_threshold: float,
    alpha: float,
    step: int,
    total_steps: int,
    use_trust: bool,
    use_annealing: bool,
    use_thinking: bool,
    unpaired_gamma: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Trust-GRPO rewards, one group at a time.

    Args:
        outcome: f64[N] rule-based outcome rewards R^o (finite).
        thinking: f64[N] thinking rewards R^t; NaN marks a missing score.
        group_ids: i64[N] group of each response, in [0, num_groups).
        num_groups: G.

    Returns:
        (reward f64[N], gamma f64[G], mu_correct f64[G], mu_wrong f64[G], annealing).
        mu_* is NaN for a group without a scored member of that kind.
    """
    outcome = np.asarray(outcome, dtype=np.float64)
    thinking = np.asarray(thinking, dtype=np.float64)
    group_ids = np.asarray(group_ids, dtype=np.int64)
    if not (len(outcome) == len(thinking) == len(group_ids)):
        raise ValueError("outcome, thinking and group_ids must have the same length")
    if not np.all(np.isfinite(outcome)):
        raise ValueError("outcome rewards must be finite")
    if np.any((group_ids < 0) | (group_ids >= num_groups)):
        raise ValueError("group ids must lie in [0, num_groups)")
    if total_steps <= 0 or step < 0 or alpha < 0:
        raise ValueError("need total_steps > 0, step >= 0, alpha >= 0")
    annealing = math.exp(-step / total_steps) if use_annealing else 1.0
    gamma = np.empty(num_groups)
    mu_correct = np.full(num_groups, np.nan)
    mu_wrong = np.full(num_groups, np.nan)
    for g in range(num_groups):
        members = group_ids == g
        scored = members & ~np.isnan(thinking)
        correct = scored & (outcome >= correct_threshold)
        wrong = scored & (outcome < correct_threshold)
        if correct.any():
            mu_correct[g] = float(np.mean(thinking[correct]))
        if wrong.any():
            mu_wrong[g] = float(np.mean(thinking[wrong]))
        if not use_trust:
            gamma[g] = 1.0
        elif not (correct.any() and wrong.any()):
            gamma[g] = unpaired_gamma
        elif mu_correct[g] >= mu_wrong[g]:
            gamma[g] = 1.0
        else:
            gamma[g] = math.exp(mu_correct[g] - mu_wrong[g])
    reward = outcome.copy()
    if use_thinking:
        for i in range(len(outcome)):
            if not math.isnan(thinking[i]):
                reward[i] += gamma[group_ids[i]] * alpha * annealing * thinking[i]
    return reward, gamma, mu_correct, mu_wrong, annealing


def group_advantages_oracle(
    rewards: np.ndarray,
    group_ids: np.ndarray,
    num_groups: int,
    *,
    eps: float,
    scale_by_std: bool,
    std_ddof: int,
) -> np.ndarray:
    """GRPO advantages f64[N]: (R - mean_g) / (std_g + eps), or R - mean_g (Dr.GRPO).

    std uses ``std_ddof`` (1 = unbiased, as torch.std). One-member and all-equal groups
    get advantage 0.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    group_ids = np.asarray(group_ids, dtype=np.int64)
    out = np.zeros_like(rewards)
    for g in range(num_groups):
        members = np.flatnonzero(group_ids == g)
        values = rewards[members]
        if len(values) <= 1 or np.all(values == values[0]):
            continue
        centred = values - values.mean()
        if scale_by_std:
            centred = centred / (values.std(ddof=std_ddof) + eps)
        out[members] = centred
    return out


def jiwer_words_oracle(text: str) -> list[str]:
    """Words of jiwer 4.0's default transform: runs of >= 2 whitespace -> ' ', strip,
    split on ' '. A single tab/newline between two words does not split them."""
    return [w for w in re.sub(r"\s\s+", " ", text).strip().split(" ") if w]


def _levenshtein(a: Sequence[str], b: Sequence[str]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i] + [0] * len(b)
        for j, y in enumerate(b, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y))
        previous = current
    return previous[-1]


def wer_oracle(reference: str, hypothesis: str) -> float:
    """Word error rate: word Levenshtein distance / max(len(reference words), 1).

    An empty reference gives the number of hypothesis words (as jiwer 4.0 does).
    """
    ref = jiwer_words_oracle(reference)
    hyp = jiwer_words_oracle(hypothesis)
    return _levenshtein(ref, hyp) / max(len(ref), 1)


@functools.cache
def _porter() -> Any:
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@functools.lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
    return _porter().stem(word)


def rouge_tokens_oracle(text: str) -> list[str]:
    """rouge-score's default tokens with stemming: lowercase, runs of [a-z0-9], words
    longer than 3 characters Porter-stemmed (nltk), empty results dropped."""
    words = re.split(r"[^a-z0-9]+", text.lower())
    tokens = [_stem(w) if len(w) > 3 else w for w in words]
    return [t for t in tokens if re.fullmatch(r"[a-z0-9]+", t)]


def _f_measure(hits: int, n_prediction: int, n_target: int) -> float:
    precision = hits / max(n_prediction, 1)
    recall = hits / max(n_target, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _ngram_f(target: list[str], prediction: list[str], n: int) -> float:
    t = collections.Counter(tuple(target[i : i + n]) for i in range(len(target) - n + 1))
    p = collections.Counter(tuple(prediction[i : i + n]) for i in range(len(prediction) - n + 1))
    hits = sum((t & p).values())
    return _f_measure(hits, sum(p.values()), sum(t.values()))


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_oracle(reference: str, hypothesis: str) -> tuple[float, float, float]:
    """(ROUGE-1 F, ROUGE-2 F, ROUGE-L F) of hypothesis against reference, with
    rouge-score's conventions (use_stemmer=True)."""
    target = rouge_tokens_oracle(reference)
    prediction = rouge_tokens_oracle(hypothesis)
    if target and prediction:
        lcs = _lcs_length(target, prediction)
        rouge_l = _f_measure(lcs, len(prediction), len(target))
    else:
        rouge_l = 0.0
    return _ngram_f(target, prediction, 1), _ngram_f(target, prediction, 2), rouge_l
