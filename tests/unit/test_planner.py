"""tools/plan.py and sophiavl_mcore/planner.py: counts, memory terms, rollout engines and
weight-sync bytes per rank checked against numbers worked out by hand in the comments,
exact agreement with the HF/meta counts, refusals."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sophiavl_mcore.config import from_dict, load_config
from sophiavl_mcore.planner import GIB, Cluster, PlanError, check_fits, count_params, plan_memory
from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tools" / "configs"

# hidden 64, 4 heads × head_dim 16, 2 KV heads, ffn 128, vocab 100, 2 layers, untied.
SMALL = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
         "num_hidden_layers": 2, "rope_theta": 10000.0, "tie_word_embeddings": False}


def _small_cfg(**parallel) -> GRPOTrainConfig:
    return from_dict(GRPOTrainConfig, {
        "model": {"hf_dir": "/nowhere", "dtype": "bfloat16"},
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
    # weight sync, bf16: one TP rank holds 43712 of the 87104 pieces and receives the
    # other TP rank's split part (43392), the replicated norms (320) it already has
    assert plan.sync.received_by_stage == (2 * (87104 - 43712),) == (2 * 43392,)
    assert plan.sync.model_bytes == 2 * 87104 and plan.sync.engine_shard_bytes == 2 * 87104
    assert plan.sync.stage_ranks == (range(0, 4),) and plan.sync.worst_rank == 0
    # 4 engines of rollout TP 1 on a 4-GPU node, 1 prompt × n=2 each
    assert (plan.engines.num_engines, plan.engines_per_node, plan.engines.prompts_per_engine) == (4, 4, 1)
    check_fits(plan)
    # without the distributed optimizer the whole 12 bytes/param stay on every rank
    plan2 = plan_memory(_small_cfg(), Cluster(1, 4, 1.0), SMALL)
    assert plan2.terms["optimizer"] == 12 * p // 2
    cfg = _small_cfg()
    cfg.optim.use_distributed_optimizer = False
    cfg.reference.offload = False
    plan3 = plan_memory(cfg, Cluster(1, 4, 1.0), SMALL)
    assert plan3.terms["optimizer"] == 12 * p and plan3.terms["reference"] == 2 * p


def test_small_float32_memory_terms_by_hand() -> None:
    cfg = _small_cfg()
    cfg.model.dtype = "float32"
    cfg.reference.offload = False
    plan = plan_memory(cfg, Cluster(1, 4, 1.0), SMALL)
    p = 43712
    t = plan.terms
    # fp32 parameters: 4 B weights, 4 B grads, Adam m + v 8 B (no master copy) over dp=2
    assert (t["weights"], t["gradients"], t["optimizer"], t["reference"]) == (4 * p, 4 * p, 8 * p // 2, 4 * p)
    assert plan.sync.received_by_stage == (4 * 43392,)  # sync in the model dtype
    assert t["vllm_weights"] == 2 * 87104  # rollout.dtype stays bfloat16


def test_small_sync_bytes_by_stage_by_hand() -> None:
    # TP=1 PP=2 on 4 GPUs: dp=2, stage 0 = ranks 0-1 holds embed + layer 0 = 6400 + 37120,
    # stage 1 = ranks 2-3 holds layer 1 + norm + head = 37120 + 64 + 6400; each receives
    # the other stage, 2 bytes an element
    plan = plan_memory(_small_cfg(tp=1, pp=2, sequence_parallel=False), Cluster(1, 4, 1.0), SMALL)
    assert plan.sync.received_by_stage == (2 * 43584, 2 * 43520)
    assert plan.sync.stage_ranks == (range(0, 2), range(2, 4))
    assert (plan.sync.worst_bytes, plan.sync.worst_stages, plan.sync.worst_rank) == (2 * 43584, [0], 0)
    # tied embeddings: the last stage's head is a mirror copy (memory: 43584 on that rank),
    # never sent; the last stage receives the embedding from stage 0 all the same.
    # Stage 0 holds 43520, stage 1 37120 + 64 = 37184 → M = 80704.
    tied = {**SMALL, "tie_word_embeddings": True}
    c = count_params(tied, tp=1, pp=2)
    assert c.per_rank == (43520, 43584) and c.sync_own == (43520, 37184) and c.sync_pieces == 80704
    plan = plan_memory(_small_cfg(tp=1, pp=2, sequence_parallel=False), Cluster(1, 4, 1.0), tied)
    assert plan.sync.received_by_stage == (2 * 37184, 2 * 43520)
    # vocab 101 at TP=2 moves padded 51-row pieces: M = 87104 + 2·64 (HF row) + 2·64
    # (padding row); a rank holds 43840 and receives the other rank's split part
    # 2·18496 + 2·51·64 = 43520 = 87360 − 43840
    c = count_params({**SMALL, "vocab_size": 101}, tp=2, pp=1)
    assert c.sync_pieces == 87360 and c.sync_own == (43840,)


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


def test_shipped_recipes_engines_and_sync_by_hand() -> None:
    # 72B, TP=8 PP=4 DP=2 on 8 nodes, rollout TP=8, bf16. Rank holdings (test above):
    # stage 0 20·109724928 + 19008·8192 + 704573696 = 3054785792, stages 1-2 2194498560,
    # stage 3 2194498560 + 8192 (final norm) + 19008·8192 (head) = 2350220288; vocab 152064
    # splits 8 ways without padding, so M = N = 73410777344.
    n72 = 73_410_777_344
    cfg = load_config(ROOT / "examples/configs/qwen2_5_vl_72b_64xh100.yaml", cls=GRPOTrainConfig)
    plan = plan_memory(cfg, Cluster(8), json.loads((CONFIGS / "qwen2_5_vl_72b_instruct.json").read_text()))
    e = plan.engines
    # 64 GPUs / 8 = 8 engines, one per node; 64 prompts / 8 = 8 each, × n=8 = 64 responses
    assert (e.num_engines, plan.engines_per_node, e.prompts_per_engine, e.responses_per_engine) == (8, 1, 8, 64)
    assert plan.sync.engine_shard_bytes == plan.terms["vllm_weights"] == 2 * n72 // 8 == 18_352_694_336
    assert plan.sync.received_by_stage == (2 * (n72 - 3_054_785_792), 2 * (n72 - 2_194_498_560),
                                           2 * (n72 - 2_194_498_560), 2 * (n72 - 2_350_220_288))
    # worst: the middle stages (fewest held), 142432557568 B = 132.65 GiB, first rank 16
    assert plan.sync.worst_bytes == 142_432_557_568 and plan.sync.worst_stages == [1, 2]
    assert plan.sync.stage_ranks[1] == range(16, 32) and plan.sync.worst_rank == 16
    # 7B, TP=4 PP=1 DP=2 on 8 GPUs, rollout TP=2. A rank's TP-split part: per layer qkv
    # 4608·3584/4 = 4128768 + bias 1152 + o 3584·3584/4 = 3211264 + fc1 2·18944·3584/4 =
    # 33947648 + fc2 16973824 = 58262656, × 28 layers + embed and head 152064·3584/4 each
    # = 1903853056. It receives the 3 other TP ranks' split parts (replicated norms and
    # the replicated vision tower it holds): 3·1903853056 elements × 2 B.
    cfg = load_config(ROOT / "examples/configs/qwen2_5_vl_7b_8xh100.yaml", cls=GRPOTrainConfig)
    plan = plan_memory(cfg, Cluster(1), json.loads((CONFIGS / "qwen2_5_vl_7b_instruct.json").read_text()))
    e = plan.engines
    assert (e.num_engines, plan.engines_per_node, e.prompts_per_engine, e.responses_per_engine) == (4, 4, 16, 128)
    assert plan.params.per_rank_tp_split == (1_903_853_056,)
    assert plan.sync.received_by_stage == (2 * 3 * 1_903_853_056,) == (11_423_118_336,)
    assert plan.sync.engine_shard_bytes == 2 * 8_292_166_656 // 2
    assert plan.sync.stage_ranks == (range(0, 8),)


@pytest.mark.parametrize("override,needles", [
    # 16 does not divide the 8 GPUs of a node
    ("rollout.tensor_parallel_size=16", ["rollout TP=16 does not divide the 8 ranks per node",
                                         "world_size=64", "prompts_per_step=64"]),
    # 8 engines cannot share 4 prompts as whole groups
    ("train.prompts_per_step=4", ["train.prompts_per_step=4 does not split into 8 engines "
                                  "(world_size=64 / rollout TP=8)"]),
])
def test_plan_tool_refuses_impossible_rollout(override: str, needles: list[str], capsys) -> None:
    rc = _plan_tool().main(["--recipe", str(ROOT / "examples/configs/qwen2_5_vl_72b_64xh100.yaml"),
                            "--nodes", "8", override])
    err = capsys.readouterr().err
    assert rc == 2
    for needle in needles:
        assert needle in err, err


def test_plan_tool_prints_topology(capsys) -> None:
    rc = _plan_tool().main(["--recipe", str(ROOT / "examples/configs/qwen2_5_vl_72b_64xh100.yaml"),
                            "--nodes", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"model config: {CONFIGS / 'qwen2_5_vl_72b_instruct.json'}" in out
    assert "rollout engines: 8 of TP=8 (1 per node; engine k = ranks 8k..8k+7)" in out
    # 142432557568 B / 2**30 = 132.65 GiB
    assert "weight sync worst rank: 16 (stage(s) [1, 2]) receives 132.65 GiB per sync" in out


_BLOCK_TORCH = """
import runpy, sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("tools/plan.py imported " + name)
        return None

sys.meta_path.insert(0, _NoTorch())
sys.argv = ["tools/plan.py", *sys.argv[1:]]
runpy.run_path("tools/plan.py", run_name="__main__")
"""


def test_plan_tool_runs_without_torch() -> None:
    """The planner is arithmetic: a login node without torch can plan a 72B run."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _BLOCK_TORCH, "--recipe",
                           str(ROOT / "examples/configs/qwen2_5_vl_72b_64xh100.yaml"), "--nodes", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.rstrip().endswith("FITS")


@pytest.mark.parametrize("name", ["qwen2_5_vl_72b_instruct.json", "qwen2_5_vl_7b_instruct.json"])
def test_vision_shapes_by_arithmetic_match_the_tower(name: str) -> None:
    """The torch-free vision shapes are the meta-device tower's, name for name."""
    import torch

    from sophiavl_mcore.checkpoint.mapping import vision_param_shapes
    from sophiavl_mcore.models.vision import build_vision_tower

    cfg = json.loads((CONFIGS / name).read_text())
    tower = build_vision_tower(cfg, dtype=torch.bfloat16, device="meta")
    assert vision_param_shapes(cfg) == [(n, tuple(p.shape)) for n, p in tower.named_parameters()]
    small = {"vision_config": {"depth": 2, "hidden_size": 128, "intermediate_size": 256,
                               "num_heads": 2, "out_hidden_size": 256, "fullatt_block_indexes": [1]}}
    tower = build_vision_tower(small, dtype=torch.bfloat16, device="meta")
    assert vision_param_shapes(small) == [(n, tuple(p.shape)) for n, p in tower.named_parameters()]
