"""GRPO loss and (single-rank) log-prob numerics against hand values and plain references.

The TP=2 vocab-parallel checks live in tests/dist/test_vocab_parallel_logprobs.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sophiavl_mcore.trainer.grpo.config import GRPOLossConfig
from sophiavl_mcore.trainer.grpo.loss import grpo_loss, loss_normalizers
from sophiavl_mcore.trainer.grpo.oracle import grpo_loss_oracle
from sophiavl_mcore.trainer.logprobs import (
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_and_entropy,
)
from sophiavl_mcore.trainer.oracle import full_vocab_logprobs_entropy

# ------------------------------------------------------------------ log-probs, TP = 1


def _logits(shape, seed=0, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_entropy_and_grads_match_full_vocab_reference(temperature):
    s, b, v = 9, 3, 50
    logits = _logits((s, b, v)).requires_grad_()
    target = torch.randint(0, v, (s, b), generator=torch.Generator().manual_seed(1))
    w_lp, w_h = _logits((s, b), seed=2, scale=1.0), _logits((s, b), seed=3, scale=1.0)

    lp, ent = vocab_parallel_logprobs_and_entropy(logits, target, None,
                                                  temperature=temperature, chunk_size=4)
    (grad,) = torch.autograd.grad((lp * w_lp + ent * w_h).sum(), logits)

    ref_logits = logits.detach().double().requires_grad_()
    rlp, rent = full_vocab_logprobs_entropy(ref_logits, target, temperature=temperature)
    (rgrad,) = torch.autograd.grad((rlp * w_lp.double() + rent * w_h.double()).sum(), ref_logits)

    assert lp.dtype == torch.float32 and lp.shape == (s, b)
    assert (lp.double() - rlp).abs().max() <= 1e-5
    assert (ent.double() - rent).abs().max() <= 1e-5
    assert (grad.double() - rgrad).abs().max() <= 1e-5
    # the temperature really enters: T=0.7 log-probs differ from T=1 ones
    if temperature != 1.0:
        plain, _ = full_vocab_logprobs_entropy(logits.detach(), target)
        assert (plain - rlp).abs().max() > 1e-2


def test_chunked_equals_unchunked_and_gradcheck():
    logits = _logits((3, 3, 9), dtype=torch.float64).requires_grad_()
    target = torch.randint(0, 9, (3, 3), generator=torch.Generator().manual_seed(4))
    one = vocab_parallel_logprobs_and_entropy(logits, target, chunk_size=10**6)
    many = vocab_parallel_logprobs_and_entropy(logits, target, chunk_size=2)
    for a, c in zip(one, many, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)
    g_one = torch.autograd.grad((one[0] + 0.5 * one[1]).sum(), logits)[0]
    g_many = torch.autograd.grad((many[0] + 0.5 * many[1]).sum(), logits)[0]
    torch.testing.assert_close(g_one, g_many, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_logprobs_and_entropy(x, target, temperature=0.6, chunk_size=4),
        (logits,),
    )


def test_bf16_logits_upcast_per_chunk_and_grad_dtype():
    logits = _logits((6, 40), dtype=torch.bfloat16).requires_grad_()
    target = torch.arange(6) * 5
    lp = vocab_parallel_logprobs(logits, target, chunk_size=4)
    ent = vocab_parallel_entropy(logits, chunk_size=4)
    rlp, rent = full_vocab_logprobs_entropy(logits.detach(), target)
    assert lp.dtype == torch.float32
    assert (lp.double() - rlp).abs().max() <= 1e-5  # fp32 math on the bf16 values
    assert (ent.double() - rent).abs().max() <= 1e-5
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_padded_vocab_columns_are_excluded_and_get_no_gradient():
    logits = _logits((4, 12)).requires_grad_()
    target = torch.tensor([0, 3, 8, 9])
    lp, ent = vocab_parallel_logprobs_and_entropy(logits, target, valid_vocab_size=10)
    rlp, rent = full_vocab_logprobs_entropy(logits.detach(), target, valid_vocab_size=10)
    assert (lp.double() - rlp).abs().max() <= 1e-5
    assert (ent.double() - rent).abs().max() <= 1e-5
    (lp.sum() + ent.sum()).backward()
    assert torch.all(logits.grad[:, 10:] == 0)
    assert torch.all(logits.grad[:, :10].abs().sum(-1) > 0)


def test_logprob_input_errors_name_shapes_and_values():
    logits = torch.zeros(3, 4, 10)
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(3, 4\)"):
        vocab_parallel_logprobs(logits, torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="min 0 max 10"):
        vocab_parallel_logprobs(logits, torch.full((3, 4), 10).index_fill_(0, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match="temperature.*0"):
        vocab_parallel_logprobs(logits, torch.zeros(3, 4, dtype=torch.long), temperature=0.0)
    with pytest.raises(TypeError, match="integer"):
        vocab_parallel_logprobs(logits, torch.zeros(3, 4))


# ------------------------------------------------------------------ GRPO loss


def _loss_inputs(b=6, s=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, s, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(b, s, generator=g, dtype=torch.float64) * 0.3  # ratios ~ e^±0.3
    ref = logp + torch.randn(b, s, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.rand(b, s, generator=g) < 0.7
    mask[0] = False  # a sequence with no response token
    mask[1, 0] = True
    ent = torch.rand(b, s, generator=g, dtype=torch.float64) * 2
    return logp, old, ref, adv, mask, ent


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_loss_matches_per_token_reference(aggregation):
    logp, old, ref, adv, mask, ent = _loss_inputs()
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.04, entropy_coef=0.01,
              aggregation=aggregation)
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, entropy=ent, **kw)
    expected = grpo_loss_oracle(logp.numpy(), old.numpy(), ref.numpy(), adv.numpy(),
                                   mask.numpy(), entropy=ent.numpy(), **kw)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    n = int(mask.sum())
    ratio = torch.exp(logp - old)[mask]
    assert metrics["train/response_tokens"].item() == n
    assert metrics["train/ratio_max"].item() == pytest.approx(ratio.max().item(), rel=1e-6)
    assert metrics["train/ratio_mean"].item() == pytest.approx(ratio.mean().item(), rel=1e-6)
    d = (ref - logp)[mask]
    assert metrics["train/kl"].item() == pytest.approx((d.exp() - d - 1).mean().item(), rel=1e-6)
    assert metrics["train/entropy"].item() == pytest.approx(ent[mask].mean().item(), rel=1e-6)
    lr = (logp - old)[mask]
    assert metrics["train/approx_kl_old"].item() == pytest.approx(
        (lr.exp() - 1 - lr).mean().item(), rel=1e-6)
    assert set(metrics) >= {"train/pg_loss", "train/kl", "train/entropy", "train/clip_fraction",
                            "train/ratio_mean", "train/ratio_max", "train/approx_kl_old"}


def _one_token(logp, old, adv, ref=None, **kw):
    lp = torch.tensor([[logp]], dtype=torch.float64, requires_grad=True)
    ref_t = None if ref is None else torch.tensor([[ref]], dtype=torch.float64)
    loss, metrics = grpo_loss(lp, torch.tensor([[old]], dtype=torch.float64), ref_t,
                              torch.tensor([adv], dtype=torch.float64),
                              torch.ones(1, 1, dtype=torch.bool), **kw)
    loss.backward()
    return loss.item(), lp.grad.item(), metrics


def test_hand_cases_clipping():
    up = math.log(1.5)  # ratio 1.5
    # A > 0, ratio above 1 + ε: clipped, constant −A·(1+ε), no gradient
    loss, grad, m = _one_token(up, 0.0, 2.0, kl_coef=0.0)
    assert loss == pytest.approx(-2.0 * 1.2) and grad == 0.0
    assert m["train/clip_fraction"].item() == 1.0
    # A < 0, ratio above 1 + ε: the unclipped (larger) loss wins, gradient −A·r
    loss, grad, m = _one_token(up, 0.0, -1.0, kl_coef=0.0)
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5)
    assert m["train/clip_fraction"].item() == 0.0
    # A < 0, ratio below 1 − ε: clipped at 0.8, no gradient
    loss, grad, _ = _one_token(math.log(0.5), 0.0, -1.0, kl_coef=0.0)
    assert loss == pytest.approx(0.8) and grad == 0.0
    # clip-higher: ratio 1.25 with ε_high = 0.28 is inside the range, gradient −A·r
    loss, grad, _ = _one_token(math.log(1.25), 0.0, 1.0, kl_coef=0.0, clip_eps_high=0.28)
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25)
    _, grad, _ = _one_token(math.log(1.25), 0.0, 1.0, kl_coef=0.0, clip_eps_high=0.2)
    assert grad == 0.0


def test_hand_cases_k3_kl():
    # equal log-probs: k3 = 0 and no gradient (ratio 1, A = 0 removes the PG term)
    loss, grad, m = _one_token(-1.0, -1.0, 0.0, ref=-1.0, kl_coef=0.5)
    assert loss == 0.0 and grad == 0.0 and m["train/kl"].item() == 0.0
    # logp above ref by 1: k3 = e^−1 + 1 − 1, gradient β·(1 − e^−1) > 0 (pushes logp down)
    loss, grad, m = _one_token(0.0, 0.0, 0.0, ref=-1.0, kl_coef=0.5)
    assert loss == pytest.approx(0.5 * math.exp(-1.0))
    assert grad == pytest.approx(0.5 * (1 - math.exp(-1.0)))
    # logp below ref by 1: k3 = e + ... , gradient β·(1 − e) < 0 (pushes logp up)
    _, grad, m = _one_token(-1.0, -1.0, 0.0, ref=0.0, kl_coef=0.5)
    assert m["train/kl"].item() == pytest.approx(math.e - 2)
    assert grad == pytest.approx(0.5 * (1 - math.e))
    # runaway reference: k3 clamped at kl_max, finite
    loss, grad, _ = _one_token(-60.0, -60.0, 0.0, ref=0.0, kl_coef=1.0)
    assert loss == pytest.approx(10.0) and grad == 0.0


def test_entropy_bonus_gradient():
    lp = torch.zeros(1, 2, dtype=torch.float64)
    ent = torch.tensor([[1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    loss, m = grpo_loss(lp, lp, None, torch.zeros(1, dtype=torch.float64),
                        torch.ones(1, 2, dtype=torch.bool), entropy=ent, entropy_coef=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(-0.1 * 2.0)
    assert torch.allclose(ent.grad, torch.full((1, 2), -0.05, dtype=torch.float64))
    assert m["train/entropy"].item() == 2.0 and math.isnan(m["train/kl"].item())


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_with_global_count_equal_full_batch(aggregation):
    logp, old, ref, adv, mask, ent = _loss_inputs(b=8, s=9, seed=5)
    kw = dict(aggregation=aggregation, entropy_coef=0.02, clip_eps_high=0.28)
    full_lp = logp.clone().requires_grad_()
    full_loss, _ = grpo_loss(full_lp, old, ref, adv, mask, entropy=ent, **kw)
    full_loss.backward()

    # 3 uneven micro-batches (as from two DP ranks' splits), normalised globally
    splits = [slice(0, 2), slice(2, 5), slice(5, 8)]
    counts = sum(loss_normalizers(mask[sl]) for sl in splits)
    glob = {"global_token_count": counts[0], "global_seq_count": counts[1]}
    mb_lp = logp.clone().requires_grad_()
    total, local_total = 0.0, 0.0
    for sl in splits:
        loss, _ = grpo_loss(mb_lp[sl], old[sl], ref[sl], adv[sl], mask[sl], entropy=ent[sl],
                            **kw, **glob)
        loss.backward()
        total += loss.item()
        local, _ = grpo_loss(logp[sl], old[sl], ref[sl], adv[sl], mask[sl], entropy=ent[sl], **kw)
        local_total += local.item() / len(splits)
    assert total == pytest.approx(full_loss.item(), rel=1e-12)
    torch.testing.assert_close(mb_lp.grad, full_lp.grad, rtol=1e-12, atol=1e-15)
    # the naive average of per-micro-batch means is a different (biased) quantity
    assert abs(local_total - full_loss.item()) > 1e-3


def test_nan_in_padding_does_not_poison_loss_or_grad():
    logp, old, ref, adv, mask, ent = _loss_inputs(seed=7)
    clean, _ = grpo_loss(logp, old, ref, adv, mask, entropy=ent, entropy_coef=0.1)
    dirty_lp = logp.masked_fill(~mask, float("nan")).requires_grad_()
    loss, _ = grpo_loss(dirty_lp, old.masked_fill(~mask, float("inf")),
                        ref.masked_fill(~mask, float("nan")), adv, mask, entropy=ent,
                        entropy_coef=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(clean.item(), rel=1e-12)
    assert torch.isfinite(dirty_lp.grad).all() and torch.all(dirty_lp.grad[~mask] == 0)


def test_loss_errors():
    logp, old, ref, adv, mask, _ = _loss_inputs(b=4, s=5)
    with pytest.raises(ValueError, match=r"old_logprobs shape \(4, 6\).*logprobs shape \(4, 5\)"):
        grpo_loss(logp, torch.zeros(4, 6), ref, adv, mask)
    with pytest.raises(ValueError, match=r"advantages shape \(3,\).*\(4,\)"):
        grpo_loss(logp, old, ref, adv[:3], mask)
    with pytest.raises(ValueError, match=r"response_mask shape \(5, 4\)"):
        grpo_loss(logp, old, ref, adv, mask.T)
    bad = adv.clone()
    bad[2] = float("nan")
    with pytest.raises(ValueError, match=r"advantages contain 1 non-finite.*\[2\]"):
        grpo_loss(logp, old, ref, bad, mask)
    with pytest.raises(ValueError, match="global_token_count = 1.0 is smaller"):
        grpo_loss(logp, old, ref, adv, mask, global_token_count=1)
    with pytest.raises(ValueError, match="only global_token_count"):
        grpo_loss(logp, old, ref, adv, mask, aggregation="seq-mean-token-sum",
                  global_token_count=100)
    with pytest.raises(ValueError, match="aggregation must be one of.*'mean'"):
        grpo_loss(logp, old, ref, adv, mask, aggregation="mean")


def test_config_defaults_and_validation():
    cfg = GRPOLossConfig()
    assert (cfg.kl_coef, cfg.clip_eps_low, cfg.clip_eps_high, cfg.entropy_coef,
            cfg.aggregation) == (0.04, 0.2, 0.2, 0.0, "token-mean")
    logp, old, ref, adv, mask, _ = _loss_inputs()
    loss, _ = grpo_loss(logp, old, ref, adv, mask, **cfg.loss_kwargs())
    expected = grpo_loss_oracle(logp.numpy(), old.numpy(), ref.numpy(), adv.numpy(),
                                   mask.numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="clip_eps_low must be >= 0.0, got -0.1"):
        GRPOLossConfig(clip_eps_low=-0.1)
    with pytest.raises(ValueError, match="clip_eps_high must be >= 0.0, got -1"):
        GRPOLossConfig(clip_eps_high=-1)
    with pytest.raises(ValueError, match="kl_coef must be >= 0.0, got -0.04"):
        GRPOLossConfig(kl_coef=-0.04)
    with pytest.raises(ValueError, match="aggregation.*'sum'"):
        GRPOLossConfig(aggregation="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kl_coef must be finite, got nan"):
        GRPOLossConfig(kl_coef=float("nan"))


def test_loss_normalizers_counts():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]])
    assert loss_normalizers(mask).tolist() == [4.0, 2.0]
    assert np.isclose(float(loss_normalizers(mask.bool())[0]), 4.0)
