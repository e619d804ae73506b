"""Per-rank bodies of the weight-sync tests (run inside ``EngineWorld`` ranks).

Each case builds a randomly initialised Megatron model (weights unlike the engine's
checkpoint), syncs it into the session's engine (rank 0, ``engine_ranks=ONE``) or, in
``every_rank_case``, into every rank's SPMD engine (``spmd_world``, the training case),
and returns plain numbers: vLLM's prompt log-probs and Megatron's on the same tokens
(last stage).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

ONE = [0]  # the session world's engine: rank 0 only (``engine_world``)
TEXT_IDS = [3, 17, 250, 9, 411, 88, 123, 600, 42, 7, 300, 5, 61, 700, 12, 99]
IMAGE_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                "What is in the picture?<|im_end|>\n<|im_start|>assistant\n")


def _setup(tp: int, pp: int, num_layers: int, heads: int, groups: int):
    from sophiavl_mcore.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    destroy_parallel(keep_process_group=True)
    return initialize_parallel(ParallelConfig(tp=tp, pp=pp, timeout_minutes=3),
                               num_layers=num_layers, num_heads=heads, num_query_groups=groups)


def _dims(model_dir: Path):
    from sophiavl_mcore.models import read_lm_dims

    d = read_lm_dims(model_dir)
    return d.num_layers, d.num_heads, d.num_kv_heads


def _perturb(model: torch.nn.Module, tp_rank: int, seed: int) -> None:
    """Random biases/norms (Megatron inits them to 0/1). TP-sharded qkv biases get a
    per-rank stream; replicated tensors the same stream on every TP rank."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                sharded = "linear_qkv.bias" in name
                g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode())
                                                  + (7919 * tp_rank if sharded else 0))
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def build_lm(model_dir: Path, info, seed: int, config_dir: Path | None = None):
    """A random Megatron Qwen2.5 LM (plain RoPE) with the engine's LM dimensions."""
    from sophiavl_mcore.models import build_qwen2_lm

    torch.manual_seed(seed)
    model = build_qwen2_lm(config_dir or model_dir, info, init_method_std=0.08)
    _perturb(model, info.tp_rank, seed)
    return model


def _schedule(model, forward_step, seq: int, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
        num_microbatches=1, seq_length=seq, micro_batch_size=1, forward_only=forward_only,
    )


def megatron_logprobs(model, info, ids: list[int], vocab: int, extra: dict | None = None,
                      train_lr: float = 0.0) -> np.ndarray | None:
    """Prompt log-probs [S-1] on the last stage (None elsewhere); with ``train_lr`` > 0,
    instead take one SGD step on their negative mean (every stage)."""
    from megatron.core import tensor_parallel

    tokens = torch.tensor([ids])
    seq = tokens.shape[1]
    train = train_lr > 0

    def forward_step(_it, m):
        if extra is not None:
            out = m(tokens, **extra)
        else:
            out = m(tokens, torch.arange(seq)[None], None)

        def loss_func(logits):
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)[..., :vocab]
            lp = torch.log_softmax(full.float(), -1)[0, :-1].gather(1, tokens[0, 1:, None])[:, 0]
            return -lp.mean(), {"lp": lp.detach()}

        return out, loss_func

    if train:
        model.train()
        model.zero_grad(set_to_none=True)
        _schedule(model, forward_step, seq, forward_only=False)
        if extra is not None and getattr(model, "visual", None) is not None:
            model.allreduce_vision_grads()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-train_lr)
        return None
    model.eval()
    with torch.no_grad():
        out = _schedule(model, forward_step, seq, forward_only=True)
    return out[0]["lp"].numpy() if info.is_last_stage else None


def vllm_logprobs(engine, prompt: dict[str, Any]) -> tuple[list[int], np.ndarray]:
    """vLLM's prompt log-probs of the actual prompt tokens (positions 1..S-1)."""
    from vllm import SamplingParams

    out = engine.llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                       temperature=1.0), use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    lps = [entry[tok].logprob for tok, entry in zip(ids[1:], out.prompt_logprobs[1:], strict=True)]
    return ids, np.asarray(lps, dtype=np.float64)


def _sync_cfg(**kw):
    from sophiavl_mcore.weight_sync import WeightSyncConfig

    # 256 KiB-ish buckets: several buckets even for the tiny model (min is 1 MiB; the
    # tiny model is ~12 MB in float32, so 1 MiB still gives a dozen buckets).
    return WeightSyncConfig(bucket_bytes=kw.pop("bucket_bytes", 2**20), **kw)


def _report(r) -> dict:
    return {"version": r.policy_version, "tensors": r.num_tensors, "buckets": r.num_buckets,
            "bytes": r.bytes_loaded, "sent": r.bytes_sent, "rss": r.peak_rss_delta_bytes,
            "debug": r.debug_max_abs_diff, "seconds": r.seconds}


# ---------------------------------------------------------------------- cases


def text_case(rank: int, ctx: dict, model_dir: str, tp: int, pp: int, seed: int,
              step: bool) -> dict:
    """Sync a random LM at (tp, pp); compare; optionally SGD step + sync + compare."""
    from sophiavl_mcore.weight_sync import MegatronWeightSync

    model_dir = Path(model_dir)
    info = _setup(tp, pp, *_dims(model_dir))
    engine = ctx.get("engine")
    vocab = _vocab(model_dir)
    res: dict[str, Any] = {"rank": rank, "last_stage": info.is_last_stage}
    if engine is not None:
        res["version_before"] = engine.policy_version
        res["vllm_before"] = vllm_logprobs(engine, {"prompt_token_ids": TEXT_IDS})[1]
    model = build_lm(model_dir, info, seed)
    sync = MegatronWeightSync(model, model_dir, engine,
                              _sync_cfg(require_complete=False, debug_compare=True), engine_ranks=ONE)
    res["mcore"] = megatron_logprobs(model, info, TEXT_IDS, vocab)
    res["report"] = _report(sync.sync())
    if engine is not None:
        res["vllm"] = vllm_logprobs(engine, {"prompt_token_ids": TEXT_IDS})[1]
        res["engine_version"] = engine.policy_version
    if step:
        megatron_logprobs(model, info, TEXT_IDS, vocab, train_lr=0.5)
        res["mcore_step"] = megatron_logprobs(model, info, TEXT_IDS, vocab)
        res["report_step"] = _report(sync.sync(version=100))
        if engine is not None:
            res["vllm_step"] = vllm_logprobs(engine, {"prompt_token_ids": TEXT_IDS})[1]
    res["policy_version"] = sync.policy_version
    return res


def vl_case(rank: int, ctx: dict, model_dir: str, tp: int, pp: int, seed: int) -> dict:
    """Sync a random Qwen2.5-VL (vision tower + M-RoPE LM); compare with an image."""
    from transformers import AutoProcessor

    from sophiavl_mcore.models.qwen2_5_vl import VisionOptions, build_qwen2_5_vl
    from sophiavl_mcore.testing.tiny_models import make_test_image
    from sophiavl_mcore.weight_sync import MegatronWeightSync

    model_dir = Path(model_dir)
    info = _setup(tp, pp, *_dims(model_dir))
    engine = ctx.get("engine")
    image = make_test_image(seed=3, size=(56, 84))
    proc = AutoProcessor.from_pretrained(str(model_dir))
    batch = proc(text=[IMAGE_PROMPT], images=[image], return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    torch.manual_seed(seed)
    model = build_qwen2_5_vl(model_dir, info, vision=VisionOptions(init_seed=seed),
                             init_method_std=0.08)
    _perturb(model, info.tp_rank, seed)
    res: dict[str, Any] = {"rank": rank, "last_stage": info.is_last_stage, "ids": ids}
    prompt = {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": image}}
    if engine is not None:
        res["vllm_before"] = vllm_logprobs(engine, prompt)[1]
    sync = MegatronWeightSync(model, model_dir, engine, _sync_cfg(debug_compare=True), engine_ranks=ONE)
    res["report"] = _report(sync.sync())
    extra = {"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
    res["mcore"] = megatron_logprobs(model, info, ids, _vocab(model_dir), extra=extra)
    if engine is not None:
        res["vllm_ids"], res["vllm"] = vllm_logprobs(engine, prompt)
    return res


def failing_case(rank: int, ctx: dict, model_dir: str, bad_config_dir: str, seed: int) -> dict:
    """Two refused syncs (renamed tensor late in the stream; wrong FFN width): the
    engine must keep its outputs and its policy version."""
    import dataclasses

    from sophiavl_mcore.weight_sync import MegatronWeightSync, WeightSyncError

    model_dir = Path(model_dir)
    info = _setup(2, 1, *_dims(model_dir))
    engine = ctx.get("engine")
    res: dict[str, Any] = {"rank": rank, "errors": []}
    if engine is not None:
        res["version_before"] = engine.policy_version
        res["vllm_before"] = vllm_logprobs(engine, {"prompt_token_ids": TEXT_IDS})[1]

    # 1. bad name: the last layer's down_proj renamed (all earlier tensors are fine)
    model = build_lm(model_dir, info, seed)
    good = MegatronWeightSync(model, model_dir, engine, _sync_cfg(require_complete=False),
                              engine_ranks=ONE)
    rules = list(good.plan.rules)
    last = max(i for i, r in enumerate(rules) if r.mcore.endswith("mlp.linear_fc2.weight"))
    rules[last] = dataclasses.replace(rules[last], hf=(rules[last].hf[0].replace("down_proj", "down_prj"),))
    res["renamed"] = rules[last].hf[0]
    sync = MegatronWeightSync(model, model_dir, engine, _sync_cfg(require_complete=False),
                              engine_ranks=ONE, plan=dataclasses.replace(good.plan, rules=rules))
    try:
        sync.sync()
    except WeightSyncError as err:
        res["errors"].append(str(err))

    # 2. shape mismatch: a trainer model with a wider FFN than the engine's
    wide = build_lm(model_dir, info, seed, config_dir=Path(bad_config_dir))
    sync = MegatronWeightSync(wide, bad_config_dir, engine, _sync_cfg(require_complete=False),
                              engine_ranks=ONE)
    try:
        sync.sync()
    except WeightSyncError as err:
        res["errors"].append(str(err))
    if engine is not None:
        res["version_after"] = engine.policy_version
        res["vllm_after"] = vllm_logprobs(engine, {"prompt_token_ids": TEXT_IDS})[1]
    res.update(_engine_failure(model, model_dir, engine, good.plan, rules, ONE))
    return res


def _engine_failure(model, model_dir: Path, engine, plan, rules, engine_ranks) -> dict:
    """A failure *inside* the engine (past validation: the renamed tensor is declared
    expected): every rank must raise it; then a good sync repairs the engine."""
    import dataclasses

    from sophiavl_mcore.weight_sync import MegatronWeightSync, WeightSyncError

    expected = None
    if engine is not None:
        from sophiavl_mcore.weight_sync.megatron_sync import engine_specs

        expected = dict(engine_specs(engine))
        expected.update({n: tuple(sh) for r in rules if not r.mirror
                         for n, sh in zip(r.hf, r.hf_shapes, strict=True)})
    bad = MegatronWeightSync(model, model_dir, engine, _sync_cfg(require_complete=False),
                             engine_ranks=engine_ranks, expected_specs=expected,
                             plan=dataclasses.replace(plan, rules=rules))
    out: dict[str, Any] = {}
    try:
        bad.sync()
        out["engine_error"] = None
    except WeightSyncError as err:
        out["engine_error"] = str(err)
    good = MegatronWeightSync(model, model_dir, engine, _sync_cfg(require_complete=False,
                                                                  debug_compare=True),
                              engine_ranks=engine_ranks)
    out["repaired"] = _report(good.sync())
    return out


def _vocab(model_dir: Path) -> int:
    from sophiavl_mcore.models import read_lm_dims

    return read_lm_dims(model_dir).vocab_size


# ---------------------------------------------------------------------- in-place path


def _greedy(engine, n: int = 8) -> list[int]:
    """Greedy continuation token ids of TEXT_IDS (rank 0's engine)."""
    from vllm import SamplingParams

    out = engine.llm.generate([{"prompt_token_ids": TEXT_IDS}],
                              SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                              use_tqdm=False)[0]
    return list(out.outputs[0].token_ids)


def inplace_vs_reload_case(rank: int, ctx: dict, model_dir: str, seed: int) -> dict:
    """TP=2 syncs of two random LMs X, Y alternating engine-update paths: X and Y via
    vLLM's reload, then X in place (re-pack), Y reload, X live, Y reload. Rank 0 records
    prompt log-probs, greedy tokens and the engine's CPU GEMM kinds after each."""
    from sophiavl_mcore.weight_sync import MegatronWeightSync
    from sophiavl_mcore.weight_sync.vllm_access import engine_model
    from sophiavl_mcore.weight_sync.vllm_inplace import live_report

    model_dir = Path(model_dir)
    info = _setup(2, 1, *_dims(model_dir))
    engine = ctx.get("engine")
    res: dict[str, Any] = {"rank": rank, "kinds": []}
    models = {"x": build_lm(model_dir, info, seed), "y": build_lm(model_dir, info, seed + 1)}
    steps = (("x_reload", "x", "reload"), ("y_reload", "y", "reload"), ("x_inplace", "x", "inplace"),
             ("y_reload2", "y", "reload"), ("x_live", "x", "live"), ("y_reload3", "y", "reload"))
    for label, which, how in steps:
        sync = MegatronWeightSync(models[which], model_dir, engine,
                                  _sync_cfg(require_complete=False, engine_update=how), engine_ranks=ONE)
        report = sync.sync()
        res["kinds"].append(report.engine_update)
        if engine is not None:
            res[label] = vllm_logprobs(engine, {"prompt_token_ids": TEXT_IDS})[1]
            res[label + "_tokens"] = _greedy(engine)
            res[label + "_kernels"] = dict(live_report(engine_model(engine)))
    return res


def corrupt_case(rank: int, ctx: dict, model_dir: str, seed: int, how: str, suffix: str) -> dict:
    """TP=2 sync (``engine_update=how``) with debug compare (clean); then 0.25 added to
    the engine's copy of the tensor ending in ``suffix`` (a view into the engine's
    parameter): compare() must refuse; a fresh sync repairs it."""
    from sophiavl_mcore.weight_sync import MegatronWeightSync, WeightSyncError
    from sophiavl_mcore.weight_sync.vllm_access import VllmReadBack, engine_model

    model_dir = Path(model_dir)
    info = _setup(2, 1, *_dims(model_dir))
    engine = ctx.get("engine")
    model = build_lm(model_dir, info, seed)
    sync = MegatronWeightSync(model, model_dir, engine, _sync_cfg(
        require_complete=False, debug_compare=True, engine_update=how), engine_ranks=ONE)
    res: dict[str, Any] = {"rank": rank, "clean": _report(sync.sync())}
    target = next(n for r in sync.plan.rules if not r.mirror for n in r.hf if n.endswith(suffix))
    res["target"] = target
    if engine is not None:
        reader = VllmReadBack(engine_model(engine), sync.plan.hf_specs())
        with torch.no_grad():
            reader.tensor(target).add_(0.25)  # writes the engine's parameter
    try:
        sync.compare()
        res["error"] = None
    except WeightSyncError as err:
        res["error"] = str(err)
    res["after_resync"] = _report(sync.sync())  # debug compare inside: raises if not repaired
    return res


def _packed_qkv(vllm_config, g: torch.Generator):
    """A real vLLM QKV layer (64 -> 128 + 64 + 64), loaded and post-processed by vLLM."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.linear import QKVParallelLinear
    from vllm.model_executor.model_loader.reload.layerwise import record_metadata_for_reloading

    ws = [torch.randn(n, 64, generator=g) for n in (128, 64, 64)]
    bias = torch.randn(256, generator=g)
    with set_current_vllm_config(vllm_config), torch.no_grad():
        layer = QKVParallelLinear(64, 64, 2, 1, bias=True, prefix="probe.qkv_proj")
        record_metadata_for_reloading(layer)
        for w, shard in zip(ws, "qkv", strict=True):
            layer.weight.weight_loader(layer.weight, w, shard)
        layer.bias.copy_(bias)
        layer.quant_method.process_weights_after_loading(layer)
    return layer, ws, bias


def live_conversion_case(rank: int, ctx: dict) -> dict:
    """Rank 0: real vLLM QKV layers packed by vLLM's CPU post-processing; (1) converted
    to a live weight with read-back, then a k shard written; (2) staged for re-pack,
    only the k shard written, re-packed."""
    if ctx.get("engine") is None:
        return {}
    from vllm.config import set_current_vllm_config

    from sophiavl_mcore.weight_sync.vllm_access import engine_worker
    from sophiavl_mcore.weight_sync.vllm_inplace import kernel_is_live, make_live
    from sophiavl_mcore.weight_sync.vllm_repack import Repacker

    vllm_config = engine_worker(ctx["engine"]).vllm_config
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 64, generator=g)
    res: dict[str, Any] = {}
    layer, (wq, wk, wv), bias = _packed_qkv(vllm_config, g)
    with set_current_vllm_config(vllm_config), torch.no_grad():
        res["packed_before"] = not kernel_is_live(layer)
        res["weight_numel_before"] = layer.weight.numel()
        y_packed = layer(x)[0].clone()
        res["converted"] = make_live(layer, overwritten=False)
        res["live_after"] = kernel_is_live(layer)
        res["weight_exact"] = bool(torch.equal(layer.weight, torch.cat([wq, wk, wv])))
        res["out_diff"] = (layer(x)[0] - y_packed).abs().max().item()
        wk2 = torch.randn(64, 64, generator=g)
        layer.weight.weight_loader(layer.weight, wk2, "k")
        expect = torch.nn.functional.linear(x, torch.cat([wq, wk2, wv]), bias)
        res["after_write_diff"] = (layer(x)[0] - expect).abs().max().item()
        res["converted_again"] = make_live(layer, overwritten=True)

    layer, (wq, wk, wv), bias = _packed_qkv(vllm_config, g)
    repacker = Repacker()
    with set_current_vllm_config(vllm_config), torch.no_grad():
        repacker.stage(layer, covered=False)  # only k arrives: q, v come from the kernel
        wk2 = torch.randn(64, 64, generator=g)
        layer.weight.weight_loader(layer.weight, wk2, "k")
        res["pending_before_finish"] = repacker.pending
        repacker.finish_all()
        expect = torch.nn.functional.linear(x, torch.cat([wq, wk2, wv]), bias)
        res["repack_diff"] = (layer(x)[0] - expect).abs().max().item()
        res["repack_packed"] = not kernel_is_live(layer) and layer.weight.numel() == 0
        res["repacked"] = repacker.repacked
        res["pool_bytes"] = repacker.pool.nbytes
    return res


def encoder_cache_case(rank: int, ctx: dict, model_dir: str, seed: int) -> dict:
    """Vision-tower updates and the engine's encoder cache: the same image is asked for
    after each of three syncs (original tower, perturbed tower, original again). A cache
    that survived an update would serve the old tower's embedding (perturbed == original
    outputs); one dropped on one side only raises ``Encoder cache miss``."""
    from transformers import AutoProcessor

    from sophiavl_mcore.models.qwen2_5_vl import VisionOptions, build_qwen2_5_vl
    from sophiavl_mcore.testing.tiny_models import make_test_image
    from sophiavl_mcore.weight_sync import MegatronWeightSync

    model_dir = Path(model_dir)
    info = _setup(2, 1, *_dims(model_dir))
    engine = ctx.get("engine")
    image = make_test_image(seed=5, size=(56, 84))
    batch = AutoProcessor.from_pretrained(str(model_dir))(text=[IMAGE_PROMPT], images=[image],
                                                          return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    extra = {"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
    torch.manual_seed(seed)
    model = build_qwen2_5_vl(model_dir, info, vision=VisionOptions(init_seed=seed),
                             init_method_std=0.08)
    vision = {n: p for n, p in model.named_parameters() if "vision" in n or "visual" in n}
    original = {n: p.detach().clone() for n, p in vision.items()}
    sync = MegatronWeightSync(model, model_dir, engine, _sync_cfg(), engine_ranks=ONE)
    prompt = {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": image}}
    res: dict[str, Any] = {"rank": rank, "last_stage": info.is_last_stage, "vision_params": len(vision)}
    for phase in ("original", "perturbed", "restored"):
        with torch.no_grad():
            for n, p in vision.items():  # the tower is TP-replicated: same change on every rank
                p.copy_(original[n] * (1.3 if phase == "perturbed" else 1.0))
        sync.sync()
        if engine is not None:
            vllm_logprobs(engine, prompt)  # first request after the update fills the cache
            res[phase] = vllm_logprobs(engine, prompt)[1]  # the second may read it
        res[f"mcore_{phase}"] = megatron_logprobs(model, info, ids, _vocab(model_dir), extra=extra)
    return res


# ---------------------------------------------------------------------- every rank holds an engine


def every_rank_case(rank: int, ctx: dict, model_dir: str, tp: int, pp: int, seed: int) -> dict:
    """The training path (``spmd_world``: an SPMD engine on every rank, default
    ``engine_ranks``): misplaced engines refused at set-up; a sync with debug compare;
    every engine's log-probs vs Megatron's; a refused sync (renamed tensor) and a
    failure inside the engines, agreed on every rank; a good sync repairs."""
    import dataclasses

    from sophiavl_mcore.weight_sync import MegatronWeightSync, WeightSyncError

    model_dir = Path(model_dir)
    info = _setup(tp, pp, *_dims(model_dir))
    engine = ctx["engine"]
    prompt = {"prompt_token_ids": TEXT_IDS}
    res: dict[str, Any] = {"rank": rank, "last_stage": info.is_last_stage, "setup_errors": []}
    model = build_lm(model_dir, info, seed)
    for eng, ranks in ((engine if rank == 0 else None, None), (engine, [0])):
        try:
            MegatronWeightSync(model, model_dir, eng, _sync_cfg(), engine_ranks=ranks)
        except ValueError as err:
            res["setup_errors"].append(str(err))
    res["vllm_before"] = vllm_logprobs(engine, prompt)[1]
    sync = MegatronWeightSync(model, model_dir, engine,
                              _sync_cfg(require_complete=False, debug_compare=True))
    res["bytes_model"] = sync.bytes_model
    res["mcore"] = megatron_logprobs(model, info, TEXT_IDS, _vocab(model_dir))
    res["report"] = {**_report(sync.sync(version=7)), "received": sync.transport.received}
    res["vllm"] = vllm_logprobs(engine, prompt)[1]
    res["engine_version"] = engine.policy_version

    rules = list(sync.plan.rules)
    last = max(i for i, r in enumerate(rules) if r.mcore.endswith("mlp.linear_fc2.weight"))
    rules[last] = dataclasses.replace(rules[last], hf=(rules[last].hf[0].replace("down_proj", "down_prj"),))
    renamed = MegatronWeightSync(model, model_dir, engine, _sync_cfg(require_complete=False),
                                 plan=dataclasses.replace(sync.plan, rules=rules))
    try:
        renamed.sync()
        res["refused"] = None
    except WeightSyncError as err:
        res["refused"] = str(err)
    res["version_after_refusal"] = engine.policy_version
    res["vllm_after_refusal"] = vllm_logprobs(engine, prompt)[1]
    res.update(_engine_failure(model, model_dir, engine, sync.plan, rules, None))
    res["vllm_repaired"] = vllm_logprobs(engine, prompt)[1]
    return res
