"""Attention dropout of the CPU (SDPA) core attention draws from Megatron's model-parallel
RNG stream, like Megatron's own core attention: the default generator (shared by the
TP-replicated parts) is left untouched, the masks are reproducible from the tracker seed,
and TP ranks (which hold different heads) use different streams."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.dist]


def _worker(rank: int) -> dict:
    import torch

    from sophiavl_mcore.models.specs import sdpa_core_attention_cls
    from sophiavl_mcore.parallel import ParallelConfig, initialize_parallel
    from sophiavl_mcore.parallel.cpu_compat import model_parallel_cpu_manual_seed

    info = initialize_parallel(ParallelConfig(tp=2), num_layers=1, num_heads=4,
                               num_query_groups=2)
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=128, num_attention_heads=4,
                            num_query_groups=2, kv_channels=32, attention_dropout=0.5,
                            tensor_model_parallel_size=2, use_cpu_initialization=True)
    attn = sdpa_core_attention_cls()(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                     attention_type="self").train()
    g = torch.Generator().manual_seed(0)  # same inputs on both ranks
    q = torch.randn(6, 1, 2, 32, generator=g)
    kv = torch.randn(6, 1, 1, 32, generator=g)

    def run():
        model_parallel_cpu_manual_seed(1234, info.tp_rank)
        torch.manual_seed(99)
        before = torch.get_rng_state()
        out = attn(q, kv, kv, None)
        return out, torch.equal(before, torch.get_rng_state())

    out1, default_untouched = run()
    out2, _ = run()
    attn.eval()
    no_dropout = attn(q, kv, kv, None)
    return {"out": out1, "repeat_equal": torch.equal(out1, out2),
            "default_untouched": default_untouched,
            "dropout_active": not torch.allclose(out1, no_dropout)}


def test_attention_dropout_uses_the_tp_rng_stream(dist_launch) -> None:
    r0, r1 = dist_launch(_worker, 2)
    for r in (r0, r1):
        assert r["dropout_active"], "attention_dropout=0.5 changed nothing"
        assert r["default_untouched"], "dropout consumed the default generator"
        assert r["repeat_equal"], "same tracker seed, different dropout mask"
    # Same inputs, different model-parallel streams → different masks.
    assert not r0["out"].equal(r1["out"])
