"""Qwen2.5 LM on real Megatron-Core over gloo: logits parity with transformers at
TP=1, TP=2, PP=2, TP=2×PP=2 (+ tied embeddings at PP=2), gradients at TP=2 and TP=2×PP=2
equal to TP=1's, HF → mcore → HF round trip bitwise at TP=2×PP=2.

One 4-process launch runs every check (process groups are reused; parallel_state is
re-initialised per layout) to keep the suite fast on 2 cores.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from _tiny import PAD_DIVISOR, VOCAB, write_tiny_qwen2

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SEQ, BATCH = 12, 2
PARITY_LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def _batch():
    import torch

    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return ids, labels


def _setup(tp: int, pp: int, hf_dir: Path, load: str = "hf", mc_dir: Path | None = None):
    from megatron.core import parallel_state as ps

    from sophiavl_mcore.checkpoint import load_hf_into_model, load_mcore_shard
    from sophiavl_mcore.models import build_qwen2_lm
    from sophiavl_mcore.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    destroy_parallel(keep_process_group=True)
    info = initialize_parallel(ParallelConfig(tp=tp, pp=pp), num_layers=4, num_heads=4,
                               num_query_groups=2)
    model = build_qwen2_lm(hf_dir, info, vocab_divisible_by=PAD_DIVISOR)
    if load == "hf":
        load_hf_into_model(model, hf_dir, tp, pp, info.tp_rank, info.pp_rank,
                           vocab_divisible_by=PAD_DIVISOR)
    else:
        load_mcore_shard(model, mc_dir, info.tp_rank, info.pp_rank)
    assert ps.get_tensor_model_parallel_world_size() == tp
    return info, model


def _run_schedule(model, forward_only: bool):
    """One micro-batch through Megatron's forward_backward_func; last stage gets logits."""
    import torch
    import torch.nn.functional as F
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ids, labels = _batch()
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)

    def loss_func(output):
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(output)[..., :VOCAB]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1))
        return loss, {"logits": logits.detach()}

    def forward_step(_it, m):
        return m(ids, pos, None), loss_func

    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
        num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH, forward_only=forward_only,
    )
    return out[0]["logits"] if out else None


def _hf_grads(model, info, hf_dir):
    """This rank's parameter grads mapped to HF names (TP ranks gathered via the plan)."""
    import torch

    from sophiavl_mcore.checkpoint import build_plan
    from sophiavl_mcore.models import read_lm_dims

    plan = build_plan(read_lm_dims(hf_dir), info.tp, info.pp, vocab_divisible_by=PAD_DIVISOR)
    params = dict(model.named_parameters())
    tp_group = __import__("megatron.core.parallel_state", fromlist=["x"]).get_tensor_model_parallel_group()
    grads = {}
    for rule in plan.rules_for_stage(info.pp_rank):
        g = params[rule.mcore].grad
        parts = [torch.empty_like(g) for _ in range(info.tp)]
        torch.distributed.all_gather(parts, g.contiguous(), group=tp_group)
        grads.update(zip(rule.hf, plan.merge(rule, parts), strict=True))
    return grads


def _worker(rank: int, hf_dir: Path, tied_dir: Path, work: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2ForCausalLM

    from sophiavl_mcore.checkpoint import (
        FORMAT,
        convert_hf_to_mcore,
        convert_mcore_to_hf,
        read_meta,
        save_mcore_shard,
    )

    ids, labels = _batch()
    res: dict = {"parity": {}, "grad_diff": {}}
    refs = {}
    for name, d in (("untied", hf_dir), ("tied", tied_dir)):
        hf = Qwen2ForCausalLM.from_pretrained(d, dtype=torch.float32)
        refs[name] = hf(ids).logits.detach()
        if name == "untied":
            F.cross_entropy(hf(ids).logits.reshape(-1, VOCAB), labels.reshape(-1)).backward()
            hf_grads = {n: p.grad for n, p in hf.named_parameters()}

    # ---- logits parity through the pipeline schedule (forward only)
    for tp, pp in PARITY_LAYOUTS:
        info, model = _setup(tp, pp, hf_dir)
        logits = _run_schedule(model.eval(), forward_only=True)
        if logits is not None:
            res["parity"][f"tp{tp}pp{pp}"] = (logits - refs["untied"]).abs().max().item()
            # Negative control: another model's logits must not pass the tolerance.
            res["control"] = (logits - refs["tied"]).abs().max().item()
            res["logit_scale"] = logits.abs().max().item()
    info, model = _setup(1, 2, tied_dir)
    logits = _run_schedule(model.eval(), forward_only=True)
    if logits is not None:
        res["parity"]["tied_tp1pp2"] = (logits - refs["tied"]).abs().max().item()

    # ---- gradients: TP=1 (no schedule), TP=2, TP=2×PP=2 (1F1B schedule with backward)
    grads = {}
    for tp, pp in ((1, 1), (2, 1), (2, 2)):
        info, model = _setup(tp, pp, hf_dir)
        _run_schedule(model.train(), forward_only=False)
        grads[(tp, pp)] = _hf_grads(model, info, hf_dir)
    for key in ((2, 1), (2, 2)):
        diffs = [(grads[key][n] - grads[(1, 1)][n]).abs().max().item() for n in grads[key]]
        res["grad_diff"][f"tp{key[0]}pp{key[1]}_vs_tp1"] = max(diffs)
        res.setdefault("grad_names", {})[f"tp{key[0]}pp{key[1]}"] = sorted(grads[key])
    res["grad_vs_hf"] = max((g - hf_grads[n]).abs().max().item() for n, g in grads[(1, 1)].items())
    res["grad_norm"] = sum(g.norm().item() for g in grads[(1, 1)].values())

    # ---- round trip HF -> mcore (offline, TP2×PP2) -> live model -> save -> HF
    mc, mc2, back = work / "mc", work / "mc2", work / "back"
    if rank == 0:
        convert_hf_to_mcore(hf_dir, mc, 2, 2, vocab_divisible_by=PAD_DIVISOR, progress=False)
    torch.distributed.barrier()
    info, model = _setup(2, 2, hf_dir, load="mcore", mc_dir=mc)
    logits = _run_schedule(model.eval(), forward_only=True)
    if logits is not None:
        res["parity"]["tp2pp2_from_converted"] = (logits - refs["untied"]).abs().max().item()
    if info.dp_rank == 0:
        meta = read_meta(mc) if rank == 0 else None
        save_mcore_shard(model, mc2, info.tp_rank, info.pp_rank, meta=meta)
    torch.distributed.barrier()
    if rank == 0:
        convert_mcore_to_hf(mc2, back, progress=False)
        res["format"] = FORMAT
    return res


def _compare_dirs(a: Path, b: Path) -> tuple[int, list[str]]:
    from safetensors.torch import load_file

    def load_all(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    ta, tb = load_all(a), load_all(b)
    bad = sorted(set(ta) ^ set(tb))
    bad += [n for n in sorted(set(ta) & set(tb))
            if ta[n].dtype != tb[n].dtype or not ta[n].view(-1).view(__import__("torch").uint8)
            .equal(tb[n].view(-1).view(__import__("torch").uint8))]
    return len(ta), bad


def test_qwen2_tp_pp_parity_grads_roundtrip(tmp_path, dist_launch):
    hf_dir = write_tiny_qwen2(tmp_path / "hf", shard=True)
    tied_dir = write_tiny_qwen2(tmp_path / "hf_tied", tied=True, seed=1)
    results = dist_launch(functools.partial(_worker), 4, hf_dir, tied_dir, tmp_path)

    parity: dict[str, float] = {}
    for r in results:
        parity.update(r["parity"])
    print("logits max abs diff vs transformers:", parity)  # noqa: T201 (test report)
    expected = {f"tp{t}pp{p}" for t, p in PARITY_LAYOUTS} | {"tied_tp1pp2", "tp2pp2_from_converted"}
    assert set(parity) == expected
    for layout, diff in parity.items():
        assert diff <= 1e-4, f"{layout}: logits differ from transformers by {diff}"

    controls = [r["control"] for r in results if "control" in r]
    print("control diff (other model):", controls, "logit scale:", results[-1].get("logit_scale"))  # noqa: T201 (test report)
    assert controls and min(controls) > 1e-2

    r0 = results[0]
    print("grad max abs diff:", r0["grad_diff"], "tp1 vs HF:", r0["grad_vs_hf"])  # noqa: T201 (test report)
    assert r0["grad_norm"] > 0
    assert r0["grad_vs_hf"] <= 1e-5
    for key, diff in r0["grad_diff"].items():
        assert diff <= 1e-5, f"{key}: gradients differ from TP=1 by {diff}"
    # TP=2×PP=2: the two stages together cover every HF parameter exactly once.
    names = [n for r in results if r["grad_names"] for n in r["grad_names"]["tp2pp2"]]
    assert len(set(names)) == len(r0["grad_names"]["tp2pp1"])

    count, bad = _compare_dirs(hf_dir, tmp_path / "back")
    assert count == 4 * 12 + 3 and not bad, f"round trip changed tensors: {bad[:5]}"
