"""Several PPO updates per rollout (``train.updates_per_rollout``) on the tiny
Qwen2.5-VL of ``test_grpo_step``, TP=2 × DP=1 (2 gloo processes).

* One update without the old-log-prob pass equals the update with it: same loss, same
  metrics, bit-identical weights (the ratio is 1 either way).
* Two updates on a drifting policy: old log-probs are taken once, so the second
  mini-batch's ratios move away from 1 and the clip acts (clip fraction > 0); its
  policy-gradient loss is the paper's clipped objective, recomputed here by hand from
  the log-probs before that update.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist.test_grpo_step import (
    ADVANTAGES,
    MICRO_BATCH,
    TEMPERATURE,
    _build,
    _rollout_batch,
)
from tests.dist.test_grpo_step import grpo_case as grpo_case  # the fixture, shared

pytestmark = [pytest.mark.dist]

CLIP = 0.2


def _fresh(root: Path, info, lr: float):
    from sophiavl_mcore.checkpoint.hf import load_hf_weights
    from sophiavl_mcore.trainer.config import OptimConfig
    from sophiavl_mcore.trainer.optim import build_optimizer, wrap_ddp

    model = _build(root / "tiny_vl", info)
    load_hf_weights(model, root / "tiny_vl", info)
    optim = OptimConfig(lr=lr, weight_decay=0.0, clip_grad=0.0, decay_style="constant")
    ddp = wrap_ddp(model, optim)
    return model, ddp, *build_optimizer([ddp], optim, total_steps=10)


def _worker(rank: int, root: str) -> dict:
    from sophiavl_mcore.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from sophiavl_mcore.trainer.grpo.step import compute_logprobs, grpo_train_step
    from sophiavl_mcore.trainer.grpo.trainer import ppo_updates
    from sophiavl_mcore.trainer.grpo.config import GRPOLossConfig

    root = Path(root)
    raw = torch.load(root / "case.pt", weights_only=True)["batch"]
    # TP=2, DP=1: the share is the whole batch of 6, two mini-batches of 3
    info = initialize_parallel(ParallelConfig(tp=2, pp=1), num_layers=2, num_heads=2,
                               num_query_groups=2)
    loss_cfg = GRPOLossConfig(kl_coef=0.0, entropy_coef=0.0, clip_eps_low=CLIP, clip_eps_high=CLIP)
    out: dict = {}

    # one update: with a separate old-log-prob pass vs. without (ppo_updates, K = 1)
    model, ddp, opt, sched = _fresh(root, info, 1e-3)
    share = _rollout_batch(raw, ADVANTAGES).shard(info.dp_rank, info.dp)
    share.old_logprobs = compute_logprobs(ddp, share, MICRO_BATCH, TEMPERATURE).logprobs
    out["with_pass"] = grpo_train_step(ddp, opt, sched, share, loss_cfg, MICRO_BATCH, TEMPERATURE)
    out["with_pass_w"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, ddp, opt, sched = _fresh(root, info, 1e-3)
    share = _rollout_batch(raw, ADVANTAGES).shard(info.dp_rank, info.dp)
    out["without"] = ppo_updates(ddp, opt, sched, None, share, loss_cfg, updates=1,
                                 micro_batch_size=MICRO_BATCH, temperature=TEMPERATURE)
    out["without_w"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    # two updates with a large step: the second mini-batch meets a moved policy
    model, ddp, opt, sched = _fresh(root, info, 5e-2)
    share = _rollout_batch(raw, ADVANTAGES).shard(info.dp_rank, info.dp)
    old = compute_logprobs(ddp, share, MICRO_BATCH, TEMPERATURE).logprobs
    first = share.select(range(0, len(share) // 2))
    first.old_logprobs = old[:len(share) // 2]
    grpo_train_step(ddp, opt, sched, first, loss_cfg, MICRO_BATCH, TEMPERATURE)
    second = share.select(range(len(share) // 2, len(share)))
    out["second_now"] = compute_logprobs(ddp, second, MICRO_BATCH, TEMPERATURE).logprobs
    out["second_old"] = old[len(share) // 2:]
    out["second_adv"] = second.advantages.tolist()
    out["second_mask"] = second.response_mask
    out["first_adv"] = first.advantages.tolist()
    out["first_mask"] = first.response_mask
    model, ddp, opt, sched = _fresh(root, info, 5e-2)
    share = _rollout_batch(raw, ADVANTAGES).shard(info.dp_rank, info.dp)
    out["two"] = ppo_updates(ddp, opt, sched, None, share, loss_cfg, updates=2,
                             micro_batch_size=MICRO_BATCH, temperature=TEMPERATURE)
    destroy_parallel(keep_process_group=True)
    return out


def test_one_update_needs_no_old_pass_and_two_updates_clip(grpo_case, dist_launch):
    results = dist_launch(_worker, 2, str(grpo_case))
    for r in results:
        a, b = r["with_pass"], r["without"]
        for key in ("train/loss", "train/pg_loss", "train/clip_fraction", "train/ratio_max",
                    "train/grad_norm", "train/logprob_mismatch"):
            assert a[key] == b[key], (key, a[key], b[key])
        assert b["train/updates"] == 1.0
        for name, w in r["with_pass_w"].items():
            assert torch.equal(w, r["without_w"][name]), name

    # the second of two updates: the clipped objective by hand (DP=1: rank 0 has it all)
    num, tokens, clipped = 0.0, 0, 0
    for r in results[:1]:
        for now, old, a, m in zip(r["second_now"], r["second_old"], r["second_adv"],
                                  r["second_mask"], strict=True):
            ratio = torch.exp(now.double() - old.double())[m]
            surrogate = torch.minimum(ratio * a, ratio.clamp(1 - CLIP, 1 + CLIP) * a)
            num -= float(surrogate.sum())
            tokens += int(m.sum())
            clipped += int(((ratio - 1).abs() > CLIP).sum())
    assert clipped > 0, "the policy did not drift far enough to clip"
    two = results[0]["two"]
    assert two["train/updates"] == 2.0 and two["train/clip_fraction"] > 0
    # ppo_updates reports the mean over its updates; the first update's ratio is 1
    # everywhere (pg = −token-mean of A over the first mini-batch), the rest is the second's
    first_num = sum(a * int(m.sum()) for a, m in zip(results[0]["first_adv"],
                                                    results[0]["first_mask"], strict=True))
    first_tokens = sum(int(m.sum()) for m in results[0]["first_mask"])
    pg_first = -first_num / first_tokens
    assert 2 * two["train/pg_loss"] - pg_first == pytest.approx(num / tokens, abs=1e-5)
