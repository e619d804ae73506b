"""tools/plan.py and sophiavl_mcore/planner.py: counts and bytes checked against numbers
worked out by hand in the comments, exact agreement with the HF/meta counts, refusals."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sophiavl_mcore.config import from_dict, load_config
from sophiavl_mcore.planner import GIB, Cluster, PlanError, check_fits, count_params, plan_memory
from sophiavl_mcore.trainer.setup import GRPOTrainConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tools" / "configs"

# hidden 64, 4 heads × head_dim 16, 2 KV heads, ffn 128, vocab 100, 2 layers, untied.
SMALL = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
         "num_hidden_layers": 2, "rope_theta": 10000.0, "tie_word_embeddings": False}


def _small_cfg(**parallel) -> GRPOTrainConfig:
    return from_dict(GRPOTrainConfig, {
        "model": {"hf_dir": "/nowhere"},
        "data": {"sources": [{"path": "/nowhere/train.jsonl"}]},
        "parallel": {"tp": 2, "pp": 1, "sequence_parallel": True, **parallel},
        "rollout": {"tensor_parallel_size": 1, "max_model_len": 64, "max_num_seqs": 4,
                    "gpu_memory_utilization": 0.5, "sampling": {"n": 2, "max_tokens": 32}},
        "optim": {"use_distributed_optimizer": True},
        "train": {"prompts_per_step": 4, "micro_batch_size": 2},
    })


def test_small_counts_by_hand() -> None:
    # per layer: q 64·64 + k,v 2·32·64 + biases 64+32+32 + o 64·64 = 12416; mlp 3·64·128 =
    # 24576; 2 norms 128 → 37120; ×2 layers + embed 6400 + head 6400 + final norm 64.
    c = count_params(SMALL, tp=1, pp=1)
    assert c.total == 87104 and c.per_rank == (87104,) and c.vision == 0
    # TP=2, one rank: qkv 64·64 + bias 64 + o 64·32 + fc1 128·64 + fc2 64·64 = 18496 split,
    # + 128 norms per layer; embed/head 50·64 each; final norm 64.
    c = count_params(SMALL, tp=2, pp=1)
    assert c.per_rank == (2 * (18496 + 128) + 3200 + 3200 + 64,)
    assert c.per_rank_tp_split == (2 * 18496 + 6400,)
    assert c.total == 87104
    # PP=2: stage 0 = embed + layer 0, stage 1 = layer 1 + norm + head.
    c = count_params(SMALL, tp=1, pp=2)
    assert c.per_rank == (6400 + 37120, 37120 + 64 + 6400)
    # vocab 101 at TP=2 is padded to 102 rows (51 a rank) but counts 101 rows once.
    c = count_params({**SMALL, "vocab_size": 101}, tp=2, pp=1)
    assert c.per_rank[0] == 2 * (18496 + 128) + 2 * 51 * 64 + 64
    assert c.total == 87104 + 2 * 64


def test_small_memory_terms_by_hand() -> None:
    plan = plan_memory(_small_cfg(), Cluster(1, 4, 1.0), SMALL, recompute="full")
    p = 43712  # per-rank params at TP=2 (test above)
    assert (plan.tp, plan.pp, plan.dp) == (2, 1, 2)
    # 4 prompts × 2 = 8 responses / dp 2 = 4 per rank / micro-batch 2 = 2 micro-batches
    assert plan.micro_batches == 2
    t = plan.terms
    assert t["weights"] == 2 * p and t["gradients"] == 4 * p
    assert t["optimizer"] == 12 * p // 2  # distributed optimizer over dp=2
    # full recompute, s=64 b=2 h=64 t=2 with SP: 2·s·b·h/t = 8192 a layer, 2 layers, 1 in
    # flight (pp=1) + one layer's selective working set 34·s·b·h/t = 139264
    assert t["activations"] == 2 * 8192 + 139264
    # no recompute: (34 + 5·a·s/h)·s·b·h/t = (34 + 20)·4096 = 221184 a layer
    assert plan.activations_by_recompute["none"] == 2 * 221184
    assert plan.activations_by_recompute["selective"] == 2 * 139264
    assert t["logits"] == 2 * 4 * 64 * 2 * 100 // 2  # fp32 logits + grad, vocab/tp
    assert t["reference"] == 0  # offloaded by default
    assert t["vllm_weights"] == 2 * 87104  # rollout TP 1
    assert t["kv_cache"] == GIB // 2 - 2 * 87104
    # K and V × 2 layers × 2 kv heads × head_dim 16 × 2 bytes
    assert plan.kv_bytes_per_token == 256
    assert plan.weight_sync_bytes_per_engine == 2 * 87104
    check_fits(plan)
    # without the distributed optimizer the whole 12 bytes/param stay on every rank
    plan2 = plan_memory(_small_cfg(), Cluster(1, 4, 1.0), SMALL)
    assert plan2.terms["optimizer"] == 12 * p // 2
    cfg = _small_cfg()
    cfg.optim.use_distributed_optimizer = False
    cfg.reference.offload = False
    plan3 = plan_memory(cfg, Cluster(1, 4, 1.0), SMALL)
    assert plan3.terms["optimizer"] == 12 * p and plan3.terms["reference"] == 2 * p


def test_small_kv_pool_too_small_is_refused() -> None:
    cfg = _small_cfg()
    cfg.rollout.gpu_memory_utilization = 0.0001  # 107374 B of 1 GiB < vLLM weights 174208 B
    with pytest.raises(PlanError, match="kv_cache"):
        check_fits(plan_memory(cfg, Cluster(1, 4, 1.0), SMALL))


@pytest.mark.parametrize("name,lm,total", [
    ("qwen2_5_vl_7b_instruct.json", 7_615_616_512, 8_292_166_656),
    ("qwen2_5_vl_72b_instruct.json", 72_706_203_648, 73_410_777_344),
])
def test_exact_counts_match_hf(name: str, lm: int, total: int) -> None:
    from sophiavl_mcore.models.hf_config import read_lm_dims
    from sophiavl_mcore.models.vision import vision_param_count

    cfg = json.loads((CONFIGS / name).read_text())
    dims = read_lm_dims(cfg)
    assert dims.hf_num_params() == lm
    assert dims.hf_num_params() + vision_param_count(cfg["vision_config"]) == total
    for tp, pp in ((4, 1), (2, 2)) if "7b" in name else ((8, 4), (8, 8)):
        c = count_params(cfg, tp, pp)
        assert (c.total, c.lm) == (total, lm), (tp, pp)
        # rank-level view: split part × tp + replicated part, over stages = total
        assert sum(s * tp + (r - s) for r, s in zip(c.per_rank, c.per_rank_tp_split, strict=True)) == total



def test_72b_middle_stage_by_hand() -> None:
    # TP=8: qkv (8192 + 2·1024)·8192/8 = 10485760, bias 10240/8 = 1280, o 8192·1024 =
    # 8388608, fc1 2·3696·8192 = 60555264, fc2 8192·3696 = 30277632, 2 norms 16384
    # → 109724928 a layer; a middle stage of PP=4 holds 20 layers and nothing else.
    cfg = json.loads((CONFIGS / "qwen2_5_vl_72b_instruct.json").read_text())
    c = count_params(cfg, 8, 4)
    assert c.per_rank[1] == c.per_rank[2] == 20 * 109_724_928
    # stage 0 adds the embedding shard 19008·8192 and the whole (replicated) vision tower
    assert c.per_rank[0] == 20 * 109_724_928 + 19008 * 8192 + 704_573_696


def _plan_tool():
    spec = importlib.util.spec_from_file_location("plan_tool", ROOT / "tools" / "plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_72b_tp1_one_node_refused_naming_weights(capsys) -> None:
    rc = _plan_tool().main(["--recipe", str(ROOT / "examples/configs/qwen2_5_vl_72b_64xh100.yaml"),
                            "--nodes", "1", "parallel.tp=1", "parallel.pp=1",
                            "parallel.sequence_parallel=false", "rollout.tensor_parallel_size=8"])
    err = capsys.readouterr().err
    assert rc == 1
    # bf16 weights of all 73,410,777,344 parameters on each GPU: 146.82e9 B = 136.74 GiB
    assert "term weights (136.74 GiB) alone exceeds" in err and "80.00 GiB" in err


def test_shipped_recipes_fit(capsys) -> None:
    tool = _plan_tool()
    for recipe, nodes in (("qwen2_5_vl_7b_8xh100.yaml", 1), ("qwen2_5_vl_72b_64xh100.yaml", 8)):
        rc = tool.main(["--recipe", str(ROOT / "examples/configs" / recipe), "--nodes", str(nodes)])
        out = capsys.readouterr()
        assert rc == 0, out.err
        assert out.out.rstrip().endswith("FITS")
    # the 72B recipe without activation recompute needs 60+ GiB of activations
    cfg = load_config(ROOT / "examples/configs/qwen2_5_vl_72b_64xh100.yaml", cls=GRPOTrainConfig)
    cfg_json = json.loads((CONFIGS / "qwen2_5_vl_72b_instruct.json").read_text())
    with pytest.raises(PlanError, match="phase train"):
        check_fits(plan_memory(cfg, Cluster(8), cfg_json, recompute="none"))
