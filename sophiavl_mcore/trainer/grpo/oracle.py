"""Test oracle of the GRPO loss: :func:`grpo_loss_oracle`, the loss written token by
token in numpy loops, straight from the formulas of :mod:`sophiavl_mcore.trainer.grpo.loss`
(no vectorisation shared with it)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["grpo_loss_oracle"]


def grpo_loss_oracle(
    logprobs: np.ndarray,
    old_logprobs: np.ndarray,
    ref_logprobs: np.ndarray | None,
    advantages: np.ndarray,
    response_mask: np.ndarray,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_coef: float = 0.04,
    entropy: np.ndarray | None = None,
    entropy_coef: float = 0.0,
    aggregation: str = "token-mean",
    normaliser: float | None = None,
    kl_max: float = 10.0,
    log_ratio_clamp: float = 20.0,
) -> float:
    """GRPO loss (float) by explicit loops over sequences b and tokens t.

    ``advantages`` is ``[B]``; ``normaliser`` is the global token count (token-mean) or
    global sequence count (seq-mean-*), default: counted here.
    """
    bsz, seq = logprobs.shape
    seq_losses: list[float] = []
    seq_tokens: list[int] = []
    for b in range(bsz):
        total, count = 0.0, 0
        for t in range(seq):
            if not response_mask[b, t]:
                continue
            lr = min(max(logprobs[b, t] - old_logprobs[b, t], -log_ratio_clamp), log_ratio_clamp)
            r = math.exp(lr)
            a = float(advantages[b])
            clipped = min(max(r, 1.0 - clip_eps_low), 1.0 + clip_eps_high)
            loss_t = max(-a * r, -a * clipped)
            if ref_logprobs is not None:
                d = ref_logprobs[b, t] - logprobs[b, t]
                d = min(max(d, -log_ratio_clamp), log_ratio_clamp)
                loss_t += kl_coef * min(math.exp(d) - d - 1.0, kl_max)
            if entropy is not None:
                loss_t -= entropy_coef * entropy[b, t]
            total += loss_t
            count += 1
        seq_losses.append(total)
        seq_tokens.append(count)
    if aggregation == "token-mean":
        n = normaliser if normaliser is not None else max(sum(seq_tokens), 1)
        return sum(seq_losses) / n
    if aggregation not in ("seq-mean-token-mean", "seq-mean-token-sum"):
        raise ValueError(f"unknown aggregation {aggregation!r}")
    n = normaliser if normaliser is not None else max(sum(1 for c in seq_tokens if c > 0), 1)
    if aggregation == "seq-mean-token-mean":
        return sum(s / c for s, c in zip(seq_losses, seq_tokens, strict=True) if c > 0) / n
    return sum(seq_losses) / n
