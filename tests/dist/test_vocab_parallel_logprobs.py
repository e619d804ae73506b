"""Vocab-parallel log-probs / entropy over a real TP=2 gloo group vs the full vocabulary.

One 2-process launch: each rank holds half of the vocabulary of the same random
``[S, B, V]`` float32 logits and returns its log-probs, entropy and logit-gradient shard
(from a weighted sum of both, and from the full GRPO loss); the parent compares them with
``log_softmax`` over the gathered vocabulary (float64) and its gradient slice.
"""

from __future__ import annotations

import pytest
import torch

from sophiavl_mcore.trainer.grpo.loss import grpo_loss
from sophiavl_mcore.trainer.oracle import full_vocab_logprobs_entropy

pytestmark = [pytest.mark.dist]

TP = 2
S, B, V = 11, 3, 64
TEMPERATURE = 0.8
CASES = {  # name: (valid_vocab_size, chunk_size)
    "full-vocab-chunked": (V, 5),
    "full-vocab-one-chunk": (V, 4096),
    "padded-vocab": (V - 9, 7),  # rank 1 holds 9 padding columns
    "rank1-all-padding": (V // 2 - 3, 4),  # rank 1 has no valid column at all
}


def _data(valid: int):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(S, B, V, generator=g) * 4
    target = torch.randint(0, valid, (S, B), generator=g)
    w_lp, w_h = torch.randn(S, B, generator=g), torch.randn(S, B, generator=g)
    old = torch.randn(S, B, generator=g) * 0.3  # offsets added to the log-probs
    ref = torch.randn(S, B, generator=g) * 0.3
    adv = torch.randn(B, generator=g)
    mask = torch.rand(S, B, generator=g) < 0.8
    return logits, target, w_lp, w_h, old, ref, adv, mask


def _grpo(lp, ent, old_off, ref_off, adv, mask):
    """GRPO loss of Megatron-layout [S, B] tensors (transposed to [B, S])."""
    base = lp.detach()
    loss, _ = grpo_loss(lp.T, (base + old_off).T, (base + ref_off).T, adv, mask.T,
                        entropy=ent.T, entropy_coef=0.01, clip_eps_high=0.28)
    return loss


def _rank_fn(rank: int) -> dict:
    import torch.distributed as dist

    from sophiavl_mcore.trainer.logprobs import vocab_parallel_logprobs_and_entropy

    dist.init_process_group("gloo")
    group = dist.new_group([0, 1])
    width = V // TP
    out = {}
    for name, (valid, chunk) in CASES.items():
        logits, target, w_lp, w_h, old, ref, adv, mask = _data(valid)
        shard = logits[..., rank * width:(rank + 1) * width].clone().requires_grad_()
        kw = dict(vocab_start_index=rank * width, temperature=TEMPERATURE,
                  valid_vocab_size=valid, chunk_size=chunk)
        lp, ent = vocab_parallel_logprobs_and_entropy(shard, target, group, **kw)
        (g_sum,) = torch.autograd.grad((lp * w_lp + ent * w_h).sum(), shard)
        lp, ent = vocab_parallel_logprobs_and_entropy(shard, target, group, **kw)
        (g_loss,) = torch.autograd.grad(_grpo(lp, ent, old, ref, adv, mask), shard)
        out[name] = (lp.detach(), ent.detach(), g_sum, g_loss)
    return out


@pytest.fixture(scope="module")
def per_rank(dist_launch):
    return dist_launch(_rank_fn, TP)


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_full_vocab_reference(per_rank, case):
    valid, _ = CASES[case]
    logits, target, w_lp, w_h, old, ref, adv, mask = _data(valid)
    full = logits.double().requires_grad_()
    rlp, rent = full_vocab_logprobs_entropy(full, target, temperature=TEMPERATURE,
                                            valid_vocab_size=valid)
    (rg_sum,) = torch.autograd.grad((rlp * w_lp.double() + rent * w_h.double()).sum(), full)
    rlp, rent = full_vocab_logprobs_entropy(full, target, temperature=TEMPERATURE,
                                            valid_vocab_size=valid)
    (rg_loss,) = torch.autograd.grad(_grpo(rlp, rent, old.double(), ref.double(),
                                           adv.double(), mask), full)
    width = V // TP
    diffs = {}
    for rank, results in enumerate(per_rank):
        lp, ent, g_sum, g_loss = results[case]
        cols = slice(rank * width, (rank + 1) * width)
        diffs[f"rank{rank}"] = {
            "logp": (lp.double() - rlp).abs().max().item(),
            "entropy": (ent.double() - rent).abs().max().item(),
            "grad_weighted_sum": (g_sum.double() - rg_sum[..., cols]).abs().max().item(),
            "grad_grpo_loss": (g_loss.double() - rg_loss[..., cols]).abs().max().item(),
        }
    worst = max(v for d in diffs.values() for v in d.values())
    assert worst <= 1e-5, f"max abs diff {worst:.3g} > 1e-5: {diffs}"
    # padded columns are out of the softmax: zero gradient there
    if valid < V:
        g_rank1 = per_rank[1][case][2]
        assert torch.all(g_rank1[..., max(valid - width, 0):] == 0)
    # both ranks agree exactly on the per-token values
    assert torch.equal(per_rank[0][case][0], per_rank[1][case][0])
