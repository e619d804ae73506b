"""72B proof: Qwen2.5-72B-Instruct and Qwen2.5-VL-72B-Instruct (LM) built per rank on the
meta device for TP=8×PP=4, TP=8×PP=8, TP=8×PP=2.

Each of the tp×pp ranks' GPTModel is really constructed by Megatron-Core (meta tensors)
with a ProcessGroupCollection whose tp/pp groups report that rank's size and rank (no
64 processes). Checked against transformers' own model built on the meta device from
the shipped config.json (independent of our code):

* per-rank parameter counts (TP-replicated norms owned by TP rank 0, as Megatron's
  ``tensor_model_parallel`` attribute says) sum exactly to the HF total;
* each rank's real parameter names/shapes equal the conversion plan's;
* every HF tensor name maps to exactly one Megatron (stage, name) and back.

Runs in one spawned process because it initialises a 1-rank gloo group.
"""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import pytest
import torch.multiprocessing as mp

CONFIGS = Path(__file__).resolve().parents[2] / "tools" / "configs"
LAYOUTS = [(8, 4), (8, 8), (8, 2)]


class _Group:
    """Size/rank of one rank's process group (all Megatron asks of it while building)."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _pg_collection(tp: int, tp_rank: int, pp: int, pp_rank: int):
    from megatron.core.process_groups_config import ProcessGroupCollection

    c = ProcessGroupCollection()
    c.tp, c.pp, c.cp, c.tp_cp = _Group(tp, tp_rank), _Group(pp, pp_rank), _Group(1, 0), _Group(tp, tp_rank)
    c.embd, c.pos_embd = _Group(2 if pp > 1 else 1, 0), _Group(1, 0)
    c.mp, c.dp, c.dp_cp = _Group(tp * pp, 0), _Group(1, 0), _Group(1, 0)
    c.ep, c.expt_tp, c.tp_ep, c.tp_ep_pp = _Group(1, 0), _Group(tp, tp_rank), _Group(tp, tp_rank), _Group(tp * pp, 0)
    c.hcp = []
    return c


def _hf_meta_state(cfg: dict) -> dict[str, tuple[int, ...]]:
    import torch
    import transformers

    if cfg["model_type"] == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(**cfg)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        config = transformers.Qwen2Config(**cfg)
        cls = transformers.Qwen2ForCausalLM
    with torch.device("meta"):
        model = cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _proof(name: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from sophiavl_mcore.checkpoint import build_plan, default_hf_prefix
    from sophiavl_mcore.models import build_qwen2_lm, read_lm_dims
    from sophiavl_mcore.parallel import ParallelConfig, initialize_parallel

    initialize_parallel(ParallelConfig())
    cfg = json.loads((CONFIGS / name).read_text())
    vl = cfg["model_type"] == "qwen2_5_vl"
    dims = read_lm_dims(cfg)
    hf = _hf_meta_state(cfg)
    out = {"hf_total": sum(torch.Size(s).numel() for s in hf.values()), "layouts": {}}
    out["hf_lm_total"] = sum(torch.Size(s).numel() for n, s in hf.items() if "visual" not in n)
    out["arith_lm_total"] = dims.hf_num_params()
    for tp, pp in LAYOUTS:
        plan = build_plan(dims, tp, pp, hf_prefix=default_hf_prefix(cfg, hf), config_json=cfg)
        lm_total, plan_total, mismatches = 0, 0, []
        for stage in range(pp):
            for r in plan.rules_for_stage(stage):
                copies = 1 if r.kind == "replicated" or r.mirror else tp
                plan_total += 0 if r.mirror else copies * torch.Size(plan.rank_shape(r)).numel()
            for tp_rank in range(tp):
                with torch.device("meta"):
                    model = build_qwen2_lm(
                        dims, ParallelConfig(tp=tp, pp=pp), dtype=torch.bfloat16,
                        pre_process=stage == 0, post_process=stage == pp - 1,
                        # init on meta costs nothing and sets Megatron's TP attributes
                        perform_initialization=True,
                        pg_collection=_pg_collection(tp, tp_rank, pp, stage),
                        position_embedding_type="mrope" if vl else "rope",
                    )
                real = {k: tuple(v.shape) for k, v in model.named_parameters()}
                # Megatron marks TP-split params; replicated ones are owned by TP rank 0.
                lm_total += sum(p.numel() for p in model.parameters()
                                if getattr(p, "tensor_model_parallel", False) or tp_rank == 0)
                lm_specs = {r.mcore: plan.rank_shape(r) for r in plan.rules_for_stage(stage)
                            if "visual" not in r.hf[0]}
                if real != lm_specs:
                    mismatches.append((stage, tp_rank, sorted(set(real) ^ set(lm_specs))[:3]))
        hf_to_m: dict[str, list] = {}
        for rule in plan.rules:
            if not rule.mirror:
                for n, s in zip(rule.hf, rule.hf_shapes, strict=True):
                    hf_to_m.setdefault(n, []).append((rule.stage, rule.mcore, s))
        out["layouts"][f"tp{tp}pp{pp}"] = {
            "lm_total": lm_total,
            "plan_total": plan_total,
            "mismatches": mismatches,
            "hf_not_mapped": sorted(set(hf) - set(hf_to_m))[:5],
            "mapped_not_hf": sorted(set(hf_to_m) - set(hf))[:5],
            "multi": [n for n, v in hf_to_m.items() if len(v) != 1][:5],
            "shape_diff": [n for n, v in hf_to_m.items() if n in hf and v[0][2] != hf[n]][:5],
            "visual_rules": sum(1 for r in plan.rules if "visual" in r.hf[0]),
        }
    return out


def _entry(_rank: int, name: str, out: str) -> None:
    import os

    os.environ.pop("WORLD_SIZE", None)
    os.environ.pop("RANK", None)
    Path(out).write_bytes(pickle.dumps(_proof(name)))


def _run(name: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "out.pkl")
        mp.start_processes(_entry, args=(name, path), nprocs=1, start_method="spawn")
        return pickle.loads(Path(path).read_bytes())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2_5_72b_instruct.json", "qwen2_5_vl_72b_instruct.json"])
def test_72b_meta_per_rank_counts_and_name_map(name: str) -> None:
    res = _run(name)
    print(name, "HF total", res["hf_total"], "LM", res["hf_lm_total"])  # noqa: T201 (test report)
    assert res["arith_lm_total"] == res["hf_lm_total"]
    if name.startswith("qwen2_5_72b"):
        assert round(res["hf_total"] / 1e9, 1) == 72.7  # model card: "Number of Parameters: 72.7B"
    for layout, r in res["layouts"].items():
        print(layout, {k: v for k, v in r.items() if k != "mismatches"}, r["mismatches"][:2])  # noqa: T201 (test report)
        assert not r["mismatches"], f"{layout}: Megatron module shapes differ from the plan"
        assert r["lm_total"] == res["hf_lm_total"], f"{layout}: per-rank LM sum {r['lm_total']}"
        assert not r["hf_not_mapped"] or "visual" in r["hf_not_mapped"][0]
        assert not r["mapped_not_hf"] and not r["multi"] and not r["shape_diff"], layout
        if r["visual_rules"]:  # with part B's rules the whole VL model is covered exactly
            assert not r["hf_not_mapped"] and r["plan_total"] == res["hf_total"], layout
        else:
            assert r["plan_total"] == res["hf_lm_total"], layout
