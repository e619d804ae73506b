"""The CPU compatibility layer: needed (schedules fail without it), sufficient (PP=2
forward+backward through Megatron's 1F1B schedule over gloo), local (torch itself is
untouched) and reversible."""

from __future__ import annotations

import pytest
from _tiny import tiny_config

pytestmark = pytest.mark.dist


def _cfg() -> dict:
    return tiny_config().to_dict()


def _step(model, seq: int = 8, batch: int = 2):
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ids = torch.randint(0, 500, (batch, seq))
    pos = torch.arange(seq).unsqueeze(0).expand(batch, -1)

    def forward_step(_it, m):
        out = m(ids, pos, None)
        return out, lambda o: (o.float().pow(2).mean(), {"loss": o.float().pow(2).mean().detach()})

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
        num_microbatches=2, seq_length=seq, micro_batch_size=batch, forward_only=False,
    )


def _without_layer(rank: int) -> dict:
    """Megatron alone, no compat layer: the schedule's CUDA token counter must fail."""
    import torch
    from megatron.core import parallel_state

    from sophiavl_mcore.models import build_qwen2_lm

    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    model = build_qwen2_lm(_cfg(), None, use_te=False)
    try:
        _step(model)
        return {"error": None}
    except (RuntimeError, AssertionError) as err:
        return {"error": str(err)[:300]}


def _with_layer(rank: int) -> dict:
    import torch
    from megatron.core.pipeline_parallel import schedules

    from sophiavl_mcore.models import build_qwen2_lm
    from sophiavl_mcore.parallel import ParallelConfig, cpu_compat, initialize_parallel

    info = initialize_parallel(ParallelConfig(tp=1, pp=2), num_layers=4, num_heads=4,
                               num_query_groups=2)
    model = build_qwen2_lm(_cfg(), info)
    losses = _step(model)
    grad_sq = sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None)
    proxied = schedules.torch is not torch
    try:
        torch.cuda.current_device()
        global_torch_patched = True
    except (RuntimeError, AssertionError):
        global_torch_patched = False
    cpu_compat.remove()
    restored = schedules.torch is torch
    return {"losses": [float(x["loss"]) for x in losses], "grad_sq": grad_sq, "proxied": proxied,
            "global_torch_patched": global_torch_patched, "restored": restored,
            "pp_rank": info.pp_rank}


def test_megatron_schedule_needs_cuda_without_layer(dist_launch):
    (res,) = dist_launch(_without_layer, 1)
    assert res["error"] is not None, "Megatron ran on CPU without the layer: is it still needed?"
    assert any(w in res["error"].lower() for w in ("cuda", "nvidia")), res["error"]


def test_pp2_forward_backward_over_gloo_with_layer(dist_launch):
    results = sorted(dist_launch(_with_layer, 2), key=lambda r: r["pp_rank"])
    first, last = results
    assert len(last["losses"]) == 2 and all(x > 0 for x in last["losses"])  # 2 micro-batches
    assert first["losses"] == []
    # Gradients reached both stages, i.e. the backward p2p exchange ran.
    assert first["grad_sq"] > 0 and last["grad_sq"] > 0
    for r in results:
        assert r["proxied"] and r["restored"] and not r["global_torch_patched"]
