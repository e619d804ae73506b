"""Activation recompute keys of the training recipe (``model.recompute_*``) reach
Megatron and leave the maths alone: at TP=2, loss and every gradient with selective or
full (uniform, 1 layer) recompute equal those without recompute."""

from __future__ import annotations

from pathlib import Path

import pytest
from _tiny import PAD_DIVISOR, VOCAB, write_tiny_qwen2

pytestmark = [pytest.mark.dist]

VARIANTS = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full_uniform_1": {"recompute_granularity": "full", "recompute_method": "uniform",
                       "recompute_num_layers": 1},
}


def _worker(rank: int, hf_dir: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from megatron.core import tensor_parallel

    from sophiavl_mcore.checkpoint import load_hf_into_model
    from sophiavl_mcore.models import build_qwen2_lm
    from sophiavl_mcore.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from sophiavl_mcore.trainer.config import ModelConfig

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 10), generator=g)
    labels = torch.randint(0, VOCAB, (2, 10), generator=g)
    pos = torch.arange(10).unsqueeze(0).expand(2, -1)
    out: dict = {}
    for name, keys in VARIANTS.items():
        destroy_parallel(keep_process_group=True)
        info = initialize_parallel(ParallelConfig(tp=2), num_layers=4, num_heads=4,
                                   num_query_groups=2)
        overrides = ModelConfig(tiny=True, **keys).transformer_overrides()
        model = build_qwen2_lm(hf_dir, info, vocab_divisible_by=PAD_DIVISOR, **overrides)
        load_hf_into_model(model, hf_dir, 2, 1, info.tp_rank, 0, vocab_divisible_by=PAD_DIVISOR)
        model.train()
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(model(ids, pos, None))
        loss = F.cross_entropy(logits[..., :VOCAB].reshape(-1, VOCAB), labels.reshape(-1))
        loss.backward()
        out[name] = {
            "loss": loss.item(),
            "granularity": model.config.recompute_granularity,
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        }
    return out


def test_recompute_keeps_loss_and_grads(tmp_path, dist_launch) -> None:
    hf_dir = write_tiny_qwen2(tmp_path / "hf")
    for rank_out in dist_launch(_worker, 2, hf_dir):
        base = rank_out["none"]
        assert base["granularity"] is None
        for name in ("selective", "full_uniform_1"):
            got = rank_out[name]
            assert got["granularity"] == VARIANTS[name]["recompute_granularity"]
            assert got["loss"] == pytest.approx(base["loss"], abs=1e-6)
            assert set(got["grads"]) == set(base["grads"])
            worst = max((got["grads"][n] - g).abs().max().item() for n, g in base["grads"].items())
            assert worst <= 1e-6, f"{name}: gradients differ from no recompute by {worst}"


@pytest.mark.parametrize("keys, fragment", [
    ({"fp8_recipe": "blockwise"}, "needs model.fp8"),
    ({"recompute_granularity": "full"}, "needs model.recompute_method"),
    ({"recompute_method": "uniform", "recompute_num_layers": 2}, "apply only to"),
])
def test_bad_model_keys_fail_early(keys: dict, fragment: str) -> None:
    from sophiavl_mcore.trainer.config import ModelConfig

    with pytest.raises(ValueError, match=fragment):
        ModelConfig(tiny=True, **keys)
