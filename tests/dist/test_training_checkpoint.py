"""Training checkpoints on real Megatron-Core at TP=2 over gloo (2 processes).

Launch 1: a run trains 4 steps straight; in the same processes a second run trains 2
steps and saves. Launch 2 (new processes): a TP=1 layout is refused with both layouts
named; the run resumes from the checkpoint and trains 2 more steps; its final weights
must equal the straight run's bitwise. Dropout is on (torch CPU generator), the batches
come from a MixedSampler and from numpy / python / torch generators and one draw through
Megatron's RNG tracker, and the optimizer is the project's Megatron Adam + LR
warmup/decay, so each piece of saved state matters; two controls (RNG not restored,
optimizer not restored) show the comparison can fail. Finally the policy is exported to
HF (from the live model and from the checkpoint directory) and transformers' logits are
compared with Megatron's.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from _tiny import PAD_DIVISOR, VOCAB, write_tiny_qwen2

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TOTAL, HALF, BATCH = 4, 2, 2
EVAL_LEN = 10


def _eval_ids():
    import torch

    return torch.randint(0, VOCAB, (2, EVAL_LEN), generator=torch.Generator().manual_seed(99))


def _build(hf_dir: Path, tp: int):
    import numpy as np
    from megatron.core import parallel_state as ps

    from sophiavl_mcore.checkpoint import load_hf_into_model
    from sophiavl_mcore.models import build_qwen2_lm
    from sophiavl_mcore.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from sophiavl_mcore.trainer.optim import OptimConfig, build_optimizer, wrap_ddp

    destroy_parallel(keep_process_group=True)
    info = initialize_parallel(ParallelConfig(tp=tp, seed=7), num_layers=4, num_heads=4,
                               num_query_groups=2)
    np.random.seed(3)
    random.seed(5)
    model = build_qwen2_lm(hf_dir, info, vocab_divisible_by=PAD_DIVISOR, hidden_dropout=0.2,
                           attention_dropout=0.2)
    load_hf_into_model(model, hf_dir, tp, 1, info.tp_rank, 0, vocab_divisible_by=PAD_DIVISOR)
    cfg = OptimConfig(lr=3e-3, warmup_steps=1, clip_grad=1.0, weight_decay=0.01)
    ddp = wrap_ddp(model, cfg)
    optimizer, scheduler = build_optimizer([ddp], cfg, TOTAL)
    assert ps.get_tensor_model_parallel_world_size() == tp
    return info, model, ddp, optimizer, scheduler, cfg


def _sampler():
    from sophiavl_mcore.data.records import MixedSampler

    return MixedSampler([list(range(0, 50)), list(range(50, 80))], weights=[2.0, 1.0], seed=11)


def _train(ddp, optimizer, scheduler, cfg, sampler, steps: int) -> None:
    """``steps`` updates; batches mix sampler records with numpy/python/torch draws."""
    import numpy as np
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from sophiavl_mcore.trainer.optim import optimizer_step

    for _ in range(steps):
        records = sampler.next_batch(BATCH)
        seq = 8 + int(np.random.randint(0, 4)) + random.randint(0, 2)
        ids = torch.randint(0, VOCAB, (BATCH, seq))
        ids[:, 0] = torch.tensor(records) % VOCAB
        labels = torch.roll(ids, -1, dims=1)
        # A draw from Megatron's RNG tracker (the project's CPU attention draws its dropout
        # from the default generator, so nothing else here would advance the tracker).
        with tensor_parallel.get_cuda_rng_tracker().fork("data-parallel-rng"):
            keep = torch.rand(BATCH, seq) > 0.2
        labels = torch.where(keep, labels, 0)
        pos = torch.arange(seq).unsqueeze(0).expand(BATCH, -1)

        def forward_step(_it, m, ids=ids, pos=pos, labels=labels):
            per_token = m(ids, pos, None, labels=labels)
            return per_token, lambda out: (out.float().mean(), {})

        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[ddp],
            num_microbatches=1, seq_length=seq, micro_batch_size=BATCH, forward_only=False)
        result = optimizer_step(optimizer, scheduler, cfg.clip_grad)
        assert result.update_successful


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}


def _manager(root: Path, hf_dir: Path, tp: int):
    from sophiavl_mcore.checkpoint.convert import conversion_meta
    from sophiavl_mcore.checkpoint.training import CheckpointManager

    meta = conversion_meta(hf_dir, tp, 1, vocab_divisible_by=PAD_DIVISOR)
    return CheckpointManager(root, keep_last=2, save_interval=HALF, model_meta=meta)


def _first_launch(rank: int, hf_dir: Path, root: Path) -> dict:
    info, model, ddp, opt, sch, cfg = _build(hf_dir, 2)
    _train(ddp, opt, sch, cfg, _sampler(), TOTAL)
    straight = _weights(model)

    info, model, ddp, opt, sch, cfg = _build(hf_dir, 2)
    sampler = _sampler()
    _train(ddp, opt, sch, cfg, sampler, HALF)
    mgr = _manager(root, hf_dir, 2)
    assert mgr.should_save(HALF, TOTAL)
    mgr.save(HALF, ddp, opt, sch, extra_state={
        "sampler": sampler.state_dict(), "trust_grpo": {"step": HALF, "total_steps": TOTAL},
        "policy_version": HALF, "config": {"optim": cfg}})
    return {"straight": straight, "initial_lr": float(opt.param_groups[0]["lr"])}


def _resume_run(hf_dir: Path, root: Path, *, restore_rng: bool = True, optimizer: bool = True):
    info, model, ddp, opt, sch, cfg = _build(hf_dir, 2)
    sampler = _sampler()
    loaded = _manager(root, hf_dir, 2).load_latest(ddp, opt if optimizer else None, sch,
                                                   restore_rng=restore_rng)
    sampler.load_state_dict(loaded.extra_state["sampler"])
    _train(ddp, opt, sch, cfg, sampler, TOTAL - loaded.step)
    return info, model, ddp, opt, sch, loaded


def _megatron_logits(ddp):
    import torch
    from megatron.core import tensor_parallel

    ddp.eval()
    with torch.no_grad():
        ids = _eval_ids()
        out = ddp(ids, torch.arange(EVAL_LEN).unsqueeze(0).expand(2, -1), None)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(out)[..., :VOCAB]
    ddp.train()
    return logits


def _second_launch(rank: int, hf_dir: Path, root: Path, work: Path) -> dict:
    from sophiavl_mcore.checkpoint import CheckpointError
    from sophiavl_mcore.checkpoint.hf import export_hf

    res: dict = {}
    info, model, ddp, opt, sch, cfg = _build(hf_dir, 1)  # TP=1 × DP=2: another layout
    try:
        _manager(root, hf_dir, 1).load_latest(ddp, opt, sch)
        res["mismatch"] = None
    except CheckpointError as err:
        res["mismatch"] = str(err)

    res["no_rng"] = _weights(_resume_run(hf_dir, root, restore_rng=False)[1])
    res["no_optim"] = _weights(_resume_run(hf_dir, root, optimizer=False)[1])
    info, model, ddp, opt, sch, loaded = _resume_run(hf_dir, root)
    res["resumed"] = _weights(model)
    res["loaded_step"] = loaded.step
    res["extra"] = loaded.extra_state

    mgr = _manager(root, hf_dir, 2)
    mgr.save(TOTAL, ddp, opt, sch, extra_state={"policy_version": TOTAL})
    res["complete_steps"] = mgr.complete_steps()
    res["logits"] = _megatron_logits(ddp)
    live = export_hf(ddp, work / "hf_live", source_hf_dir=hf_dir, model_meta=mgr.model_meta,
                     mcore_dir=work / "mcore_live")
    if rank == 0:
        export_hf(root, work / "hf_ckpt", source_hf_dir=hf_dir)
    res["live_dir"] = str(live)
    return res


def test_resume_bitwise_tp2_and_export(tmp_path, dist_launch):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    hf_dir = write_tiny_qwen2(tmp_path / "hf")
    _write_tokenizer(hf_dir)
    root = tmp_path / "ckpt"
    first = dist_launch(_first_launch, 2, hf_dir, root)
    second = dist_launch(_second_launch, 2, hf_dir, root, tmp_path)

    for rank in range(2):
        straight, resumed = first[rank]["straight"], second[rank]["resumed"]
        assert sorted(straight) == sorted(resumed)
        differ = [k for k in straight if not torch.equal(straight[k], resumed[k])]
        assert not differ, f"rank {rank}: resumed weights differ from the straight run: {differ[:5]}"
        # Controls: each piece of restored state changes the result when left out.
        for control in ("no_rng", "no_optim"):
            assert any(not torch.equal(straight[k], second[rank][control][k]) for k in straight), \
                control
    # Training moved the weights (the comparison is not between two untouched models).
    initial = load_file(hf_dir / "model.safetensors")
    assert second[0]["loaded_step"] == HALF
    extra = second[0]["extra"]
    assert extra["trust_grpo"] == {"step": HALF, "total_steps": TOTAL}
    assert extra["config"]["optim"]["lr"] == 3e-3 and extra["sampler"]["index"] == HALF * BATCH

    msg = second[0]["mismatch"]
    assert msg is not None and "tp=2 pp=1 dp=1 (world_size=2)" in msg \
        and "tp=1 pp=1 dp=2 (world_size=2)" in msg, msg
    assert second[0]["complete_steps"] == [HALF, TOTAL]

    # HF export: transformers loads it, logits match Megatron's, live == checkpoint export.
    live, from_ckpt = Path(second[0]["live_dir"]), tmp_path / "hf_ckpt"
    a, b = load_file(live / "model.safetensors"), load_file(from_ckpt / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"],
                           initial["model.layers.0.mlp.down_proj.weight"])
    hf = Qwen2ForCausalLM.from_pretrained(live, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(_eval_ids()).logits
    diff = (ref - second[0]["logits"]).abs().max().item()
    assert diff <= 1e-4, f"exported model's logits differ from Megatron's by {diff}"
    tok = AutoTokenizer.from_pretrained(live)
    assert tok("hello world")["input_ids"] == AutoTokenizer.from_pretrained(hf_dir)(
        "hello world")["input_ids"]


def _write_tokenizer(hf_dir: Path) -> None:
    """A tiny word-level tokenizer saved beside the weights (export must copy it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(hf_dir)
