"""GRPO loss: PPO-clip policy term, k3 KL to the reference, entropy bonus, aggregation.

Per response token t of sequence b (all masked by ``response_mask``)::

    r      = exp(logp − old)                                   (importance ratio)
    pg     = max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high))      (PPO-clip, clip-higher)
    kl     = exp(ref − logp) − (ref − logp) − 1                (k3 estimator, ≥ 0)
    loss_t = pg + β·kl − c_H·H

and the per-token losses are aggregated (``aggregation``):

- ``token-mean``            Σ_{b,t} loss / N_tokens             (paper, DAPO)
- ``seq-mean-token-mean``   Σ_b [Σ_t loss / n_b] / N_seqs        (original GRPO)
- ``seq-mean-token-sum``    Σ_b [Σ_t loss] / N_seqs

**Global normalisation.** When a batch is split into micro-batches (and data-parallel
ranks), pass the *global* ``N_tokens`` (``global_token_count``) or ``N_seqs``
(``global_seq_count``) — the sums of :func:`loss_normalizers` over every micro-batch of
every DP rank. Each micro-batch's loss is then its share of the full-batch loss, and the
sum of the micro-batch gradients equals the full-batch gradient exactly. With Megatron's
``forward_backward_func`` that sum must not be averaged again: Megatron divides a
2-tuple loss by ``num_microbatches`` (and multiplies by the CP size) and DDP scales
gradients by ``1/dp_size``, so the trainer's loss function returns
``loss · num_microbatches · dp_size / cp_size`` (or uses ``calculate_per_token_loss``
with the unnormalised token sum for ``token-mean``).

**Numerical clamps** (zero gradient where active, as in verl's ``low_var_kl``):

- log-ratios ``logp − old`` and ``ref − logp`` are clamped to ±``LOG_RATIO_CLAMP`` (20)
  before ``exp`` so that a far-off token cannot overflow fp32 (e^20 ≈ 4.9e8);
- the k3 value is clamped to ``kl_max`` (default 10): beyond it one token with a
  runaway reference ratio would dominate the batch's KL gradient.

Masked-out positions are replaced by 0 before any arithmetic, so NaN/inf garbage in
padding cannot reach the loss or its gradient.
"""

from __future__ import annotations

import math

import torch

from sophiavl_mcore.trainer.grpo.config import check_loss_settings

__all__ = [
    "LOG_RATIO_CLAMP",
    "grpo_loss",
    "loss_normalizers",
]

LOG_RATIO_CLAMP = 20.0


def loss_normalizers(response_mask: torch.Tensor) -> torch.Tensor:
    """fp64 ``[2]``: (number of response tokens, number of sequences with ≥ 1 of them).

    Sum this over the micro-batches of a step and all-reduce it (SUM) over the
    data-parallel group to get ``global_token_count`` / ``global_seq_count``.
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, S], got shape {tuple(response_mask.shape)}")
    per_seq = (response_mask != 0).sum(-1)
    return torch.stack([per_seq.sum(), (per_seq > 0).sum()]).double()


def _check_shapes(logprobs: torch.Tensor, named: dict[str, torch.Tensor | None],
                  advantages: torch.Tensor) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, S], got shape {tuple(logprobs.shape)}")
    for name, t in named.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} does not match logprobs shape "
                f"{tuple(logprobs.shape)}"
            )
    b = logprobs.shape[0]
    if advantages.shape not in ((b,), logprobs.shape):
        raise ValueError(
            f"advantages shape {tuple(advantages.shape)} must be [B] = ({b},) or [B, S] = "
            f"{tuple(logprobs.shape)} (logprobs shape {tuple(logprobs.shape)})"
        )


def _check_finite(advantages: torch.Tensor, mask: torch.Tensor,
                  named: dict[str, torch.Tensor | None]) -> None:
    """One host sync: non-finite advantages, or non-finite inputs at response tokens."""
    names = [k for k, v in named.items() if v is not None]
    bad = [(~torch.isfinite(advantages)).sum()]
    bad += [(~torch.isfinite(named[k]) & mask).sum() for k in names]
    counts = torch.stack(bad).tolist()
    if counts[0]:
        idx = torch.nonzero(~torch.isfinite(advantages)).flatten()[:8].tolist()
        raise ValueError(
            f"advantages contain {counts[0]} non-finite value(s) (NaN/inf) of "
            f"{advantages.numel()}, first indices {idx}; check the rewards of those groups"
        )
    for name, count in zip(names, counts[1:], strict=True):
        if count:
            raise ValueError(f"{name} has {count} non-finite value(s) at response tokens")


def _normaliser(name: str, value: float | torch.Tensor | None, local: float) -> float | torch.Tensor:
    if value is None:
        return max(local, 1.0)  # an empty micro-batch gives loss 0, not NaN
    v = value.detach().double() if isinstance(value, torch.Tensor) else value
    if isinstance(v, torch.Tensor) and v.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(v.shape)}")
    fv = float(v)
    if not (math.isfinite(fv) and fv > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {fv}")
    if fv < local:
        raise ValueError(
            f"{name} = {fv} is smaller than this micro-batch's own count {local}; it must "
            "be the total over all micro-batches and data-parallel ranks"
        )
    return fv


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    kl_coef: float = 0.04,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    aggregation: str = "token-mean",
    global_token_count: float | torch.Tensor | None = None,
    global_seq_count: float | torch.Tensor | None = None,
    kl_max: float = 10.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss of one micro-batch (see the module docstring for the formulas).

    Args:
        logprobs: ``[B, S]`` current policy log-probs of the sampled tokens (differentiable).
        old_logprobs: ``[B, S]`` log-probs of the policy that sampled (no gradient).
        ref_logprobs: ``[B, S]`` frozen reference policy log-probs, or ``None`` (no KL term;
            then ``kl_coef`` is ignored).
        advantages: ``[B]`` per-sequence (GRPO) or ``[B, S]`` per-token advantages.
        response_mask: ``[B, S]`` bool/0-1, true at response tokens that enter the loss.
        clip_eps_low, clip_eps_high: ratio clip range ``[1 − ε_low, 1 + ε_high]``.
        kl_coef: β of the k3 KL penalty.
        entropy: ``[B, S]`` per-token entropy (nats, differentiable) or ``None``.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        aggregation: ``token-mean`` | ``seq-mean-token-mean`` | ``seq-mean-token-sum``.
        global_token_count: total response tokens of the whole batch (token-mean); default:
            this micro-batch's count.
        global_seq_count: total sequences with a response token (seq-mean-*); default:
            this micro-batch's count.
        kl_max: upper clamp of the per-token k3 value.

    Returns:
        ``(loss, metrics)``: a 0-d fp32 loss, and detached 0-d tensors, means over this
        micro-batch's response tokens (0 when it has none): ``train/pg_loss``,
        ``train/kl`` (NaN without a reference), ``train/entropy`` (NaN without entropy),
        ``train/clip_fraction`` (share of tokens whose clipped term is active, i.e. zero
        policy gradient), ``train/ratio_mean``, ``train/ratio_max``,
        ``train/approx_kl_old`` (k3 of KL(old‖current)), and ``train/response_tokens``
        (the count, to weight these means across micro-batches).
    """
    check_loss_settings(clip_eps_low, clip_eps_high, kl_coef, entropy_coef, aggregation, kl_max)
    named = {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs,
             "response_mask": response_mask, "entropy": entropy}
    _check_shapes(logprobs, named, advantages)
    if aggregation == "token-mean" and global_seq_count is not None and global_token_count is None:
        raise ValueError("aggregation 'token-mean' normalises by global_token_count, "
                         f"but only global_seq_count={global_seq_count} was given")
    if aggregation != "token-mean" and global_token_count is not None and global_seq_count is None:
        raise ValueError(f"aggregation {aggregation!r} normalises by global_seq_count, "
                         f"but only global_token_count={global_token_count} was given")
    mask = response_mask != 0
    _check_finite(advantages, mask, {"logprobs": logprobs, "old_logprobs": old_logprobs,
                                     "ref_logprobs": ref_logprobs, "entropy": entropy})
    dt = torch.promote_types(logprobs.dtype, torch.float32)
    zero = torch.zeros((), dtype=dt, device=logprobs.device)

    def clean(t: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, t.to(dt), zero)

    logp = clean(logprobs)
    adv = advantages.to(dt).unsqueeze(-1) if advantages.dim() == 1 else clean(advantages)
    log_ratio = (logp - clean(old_logprobs).detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    per_token = pg
    kl = None
    if ref_logprobs is not None:
        d = (clean(ref_logprobs).detach() - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = (torch.exp(d) - d - 1.0).clamp(max=kl_max)
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
    ent = clean(entropy) if entropy is not None else None
    if ent is not None and entropy_coef > 0:
        per_token = per_token - entropy_coef * ent
    per_token = torch.where(mask, per_token, zero)

    tokens_per_seq = mask.sum(-1).to(dt)
    n_tok = tokens_per_seq.sum()
    n_tok_f, n_seq_f = (float(v) for v in torch.stack([n_tok, (tokens_per_seq > 0).sum()]).tolist())
    if aggregation == "token-mean":
        loss = per_token.sum() / _normaliser("global_token_count", global_token_count, n_tok_f)
    else:
        seq_sum = per_token.sum(-1)
        if aggregation == "seq-mean-token-mean":
            seq_sum = seq_sum / tokens_per_seq.clamp(min=1.0)
        loss = seq_sum.sum() / _normaliser("global_seq_count", global_seq_count, n_seq_f)

    metrics = _metrics(mask, n_tok, pg, pg_unclipped, pg_clipped, ratio, log_ratio, kl, ent)
    return loss, metrics


@torch.no_grad()
def _metrics(mask: torch.Tensor, n_tok: torch.Tensor, pg: torch.Tensor,
             pg_unclipped: torch.Tensor, pg_clipped: torch.Tensor, ratio: torch.Tensor,
             log_ratio: torch.Tensor, kl: torch.Tensor | None,
             ent: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Detached fp32 means over the response tokens (see :func:`grpo_loss`)."""
    zero = torch.zeros((), dtype=pg.dtype, device=pg.device)
    denom = n_tok.clamp(min=1.0)

    def mmean(t: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, t, zero).sum() / denom

    nan = torch.full((), math.nan, dtype=pg.dtype, device=pg.device)
    metrics = {
        "train/pg_loss": mmean(pg),
        "train/kl": mmean(kl) if kl is not None else nan,
        "train/entropy": mmean(ent) if ent is not None else nan,
        "train/clip_fraction": mmean((pg_clipped > pg_unclipped).to(pg.dtype)),
        "train/ratio_mean": mmean(ratio),
        # ratio > 0, so masked zeros never win the max; 0 for an empty micro-batch
        "train/ratio_max": torch.where(mask, ratio, zero).amax() if mask.numel() else zero,
        "train/approx_kl_old": mmean(ratio - 1.0 - log_ratio),
        "train/response_tokens": n_tok,
    }
    return {k: v.detach().float() for k, v in metrics.items()}
