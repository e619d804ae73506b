"""Bucket schedule arithmetic (no processes, no engine)."""

from __future__ import annotations

import pytest
import torch

from sophiavl_mcore.checkpoint import build_plan
from sophiavl_mcore.models import read_lm_dims
from sophiavl_mcore.weight_sync import WeightSyncConfig
from sophiavl_mcore.weight_sync.schedule import RankCoord, build_buckets, source_table

CFG = {"model_type": "qwen2", "hidden_size": 256, "num_hidden_layers": 4,
       "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512,
       "vocab_size": 1000, "rope_theta": 1e6, "tie_word_embeddings": True}


def _coords(tp: int, pp: int, dp: int) -> list[RankCoord]:
    # Megatron's default order: TP fastest, then DP, then PP.
    return [RankCoord(r, r % tp, r // (tp * dp), (r // tp) % dp) for r in range(tp * pp * dp)]


def _plan_and_sources(tp, pp, dp=1):
    plan = build_plan(read_lm_dims(CFG), tp, pp)
    return plan, source_table(_coords(tp, pp, dp), tp, pp)


@pytest.mark.parametrize("bucket", [2**20, 3 * 2**20, 2**30])
def test_buckets_cover_every_rule_once_and_respect_the_bound(bucket):
    plan, sources = _plan_and_sources(2, 2, dp=2)
    dtypes = {(r.stage, r.mcore): torch.bfloat16 for r in plan.rules}
    buckets = build_buckets(plan, dtypes, sources, bucket)
    rules = [r for b in buckets for r in b.rules]
    # tied embeddings at PP=2: the last stage's head copy is not sent twice
    assert len(rules) == len([r for r in plan.rules if not r.mirror]) == len(plan.rules) - 1
    assert all(not r.mirror for r in rules)
    for b in buckets:
        assert b.nbytes == sum(p.nbytes for p in b.pieces)
        assert b.nbytes <= bucket or len(b.rules) == 1
    # pieces come from DP replica 0 only; replicated rules from TP rank 0 only
    dp0 = {c.rank for c in _coords(2, 2, 2) if c.dp_rank == 0}
    assert {p.src for b in buckets for p in b.pieces} == dp0
    for b in buckets:
        for p in b.pieces:
            if p.rule.kind == "replicated":
                assert p.tp_rank == 0
            assert p.src == sources[(p.rule.stage, p.tp_rank)]


def test_oversized_tensor_travels_alone_and_order_is_plan_order():
    plan, sources = _plan_and_sources(1, 1)
    dtypes = {(r.stage, r.mcore): torch.float32 for r in plan.rules}
    emb_bytes = 1000 * 256 * 4  # ~1 MB > bound below
    buckets = build_buckets(plan, dtypes, sources, emb_bytes - 1)
    assert buckets[0].rules[0].mcore == "embedding.word_embeddings.weight"
    assert len(buckets[0].rules) == 1
    flat = [r.mcore for b in buckets for r in b.rules]
    assert flat == [r.mcore for r in plan.rules if not r.mirror]


def test_source_table_rejects_incomplete_layouts():
    coords = [c for c in _coords(2, 2, 1) if c.rank != 3]
    with pytest.raises(ValueError, match=r"\(1, 1\)"):
        source_table(coords, 2, 2)


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="bucket_bytes=10 .*debug_atol=-1"):
        WeightSyncConfig(bucket_bytes=10, debug_atol=-1)
    with pytest.raises(ValueError, match="engine_update='fast' must be auto, inplace, live or reload"):
        WeightSyncConfig(engine_update="fast")


@pytest.mark.parametrize("tp", [1, 2])
def test_qkv_merge_inverts_shard(tp):
    """The one-copy q/k/v regrouping (``ConversionPlan.merge``, run by every sync)
    gives back the HF tensors that ``shard`` (concatenate + chunk) split over TP."""
    plan = build_plan(read_lm_dims(CFG), tp, 1)
    g = torch.Generator().manual_seed(tp)
    for rule in (r for r in plan.rules if r.kind == "qkv"):
        hf = [torch.randn(s, generator=g) for s in rule.hf_shapes]
        pieces = [plan.shard(rule, hf, r).contiguous() for r in range(tp)]
        assert all(tuple(p.shape) == plan.rank_shape(rule) for p in pieces)
        merged = plan.merge(rule, pieces)
        assert [t.shape for t in merged] == [torch.Size(s) for s in rule.hf_shapes]
        for a, b in zip(merged, hf, strict=True):
            assert torch.equal(a, b)
