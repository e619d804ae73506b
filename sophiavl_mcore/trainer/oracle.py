"""Test oracles for the trainer numerics: plain versions the tests compare the fast paths to.

- :func:`full_vocab_logprobs_entropy`: ``log_softmax`` over the whole, gathered
  vocabulary in float64 — what :mod:`sophiavl_mcore.trainer.logprobs` computes
  shard-wise.
"""

from __future__ import annotations

import torch

__all__ = ["full_vocab_logprobs_entropy"]


def full_vocab_logprobs_entropy(
    full_logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    valid_vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of the targets and entropy (nats) of ``softmax(logits[..., :valid] / T)``.

    Args:
        full_logits: ``[..., V]`` the whole vocabulary (differentiable).
        target_ids: int ``[...]``.
    Returns:
        float64 ``(logprobs [...], entropy [...])``.
    """
    v = full_logits.shape[-1] if valid_vocab_size is None else valid_vocab_size
    logsm = torch.log_softmax(full_logits[..., :v].double() / temperature, dim=-1)
    logp = logsm.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy
