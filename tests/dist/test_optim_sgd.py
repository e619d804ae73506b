"""``optim.optimizer: sgd`` reaches Megatron's optimizer: one update with momentum 0 is
exactly ``w - lr * grad`` (and Adam's first update is not), at TP=2 over gloo."""

from __future__ import annotations

import pytest
from _tiny import PAD_DIVISOR, VOCAB, write_tiny_qwen2

pytestmark = [pytest.mark.dist]

LR = 0.05


def _worker(rank: int, hf_dir) -> dict:
    import torch
    import torch.nn.functional as F
    from megatron.core import tensor_parallel

    from sophiavl_mcore.checkpoint import load_hf_into_model
    from sophiavl_mcore.models import build_qwen2_lm
    from sophiavl_mcore.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from sophiavl_mcore.trainer.config import OptimConfig
    from sophiavl_mcore.trainer.optim import build_optimizer, optimizer_step, wrap_ddp

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 8), generator=g)
    labels = torch.randint(0, VOCAB, (2, 8), generator=g)
    pos = torch.arange(8).unsqueeze(0).expand(2, -1)
    out = {}
    for kind in ("sgd", "adam"):
        destroy_parallel(keep_process_group=True)
        info = initialize_parallel(ParallelConfig(tp=2), num_layers=4, num_heads=4,
                                   num_query_groups=2)
        model = build_qwen2_lm(hf_dir, info, vocab_divisible_by=PAD_DIVISOR)
        load_hf_into_model(model, hf_dir, 2, 1, info.tp_rank, 0, vocab_divisible_by=PAD_DIVISOR)
        cfg = OptimConfig(optimizer=kind, sgd_momentum=0.0, lr=LR, clip_grad=0.0,
                          decay_style="constant")
        ddp = wrap_ddp(model, cfg)
        optimizer, scheduler = build_optimizer([ddp], cfg, total_steps=2)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(ddp(ids, pos, None))
        F.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB), labels.reshape(-1)).backward()
        ddp.finish_grad_sync()
        grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
        optimizer_step(optimizer, scheduler, cfg.clip_grad)
        out[kind] = max((p.detach() - (before[n] - LR * grads[n])).abs().max().item()
                        for n, p in model.named_parameters())
        out[kind + "_moved"] = max((p.detach() - before[n]).abs().max().item()
                                   for n, p in model.named_parameters())
    return out


def test_sgd_update_is_w_minus_lr_grad(tmp_path, dist_launch) -> None:
    hf_dir = write_tiny_qwen2(tmp_path / "hf")
    for r in dist_launch(_worker, 2, hf_dir):
        assert r["sgd_moved"] > 0 and r["adam_moved"] > 0
        assert r["sgd"] <= 1e-6, f"SGD step differs from w - lr*g by {r['sgd']}"
        assert r["adam"] > 1e-3, "control: Adam's first step is not w - lr*g"


def test_sgd_momentum_is_checked() -> None:
    from sophiavl_mcore.trainer.config import OptimConfig

    with pytest.raises(ValueError, match="sgd_momentum=1.0"):
        OptimConfig(optimizer="sgd", sgd_momentum=1.0)
