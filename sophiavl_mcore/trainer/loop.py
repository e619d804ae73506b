"""The pieces of one Trust-GRPO step, called in order by :mod:`sophiavl_mcore.train`.

Data placement (CPU, colocated): every rank samples the same prompts (the sampler is
deterministic) and loads their images itself; rank 0 generates with its vLLM engine,
scores outcome and thinking rewards (the in-process TRM shares that engine) and
broadcasts one plain-Python object with token ids, log-probs and rewards. From there
every rank builds the same :class:`RolloutBatch` and takes its data-parallel share.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sophiavl_mcore.data.records import Record
from sophiavl_mcore.rollout.interface import vision_token_ids
from sophiavl_mcore.trainer.rollout_batch import RolloutBatch
from sophiavl_mcore.trainer.setup import GRPOTrainConfig, model_dir, torch_dtype

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """A built run: this rank's policy stage, optimizer, reference, engine (rank 0)."""

    cfg: GRPOTrainConfig
    info: Any
    model: torch.nn.Module
    ddp: Any
    optimizer: Any
    scheduler: Any
    reference: Any
    engine: Any
    sync: Any
    trm: Any
    sampler: Any
    tokenizer: Any
    image_loader: Any
    meta: dict[str, Any]
    pad_id: int
    ckpt: Any = None
    start_step: int = 1


@dataclasses.dataclass
class Rollout:
    """One step's prompts, images and responses (identical on every rank).

    ``responses[i]``: dicts with ``ids`` (list[int]), ``logprobs`` (list[float]),
    ``text``, ``finish``; ``outcome`` / ``thinking`` f64 [N] (thinking NaN = missing).
    """

    records: list[Record]
    prompt_ids: list[list[int]]
    pixel_values: list[torch.Tensor | None]
    grids: list[torch.Tensor | None]
    responses: list[list[dict[str, Any]]]
    outcome: np.ndarray
    accuracy: np.ndarray
    well_formed: np.ndarray
    thinking: np.ndarray
    trm_metrics: dict[str, float]
    images: list[Any]


def build_engine(cfg: GRPOTrainConfig) -> Any:
    """Rank 0's colocated vLLM engine, built before the trainer's process group."""
    from sophiavl_mcore.rollout.vllm_engine import VllmRolloutEngine
    from sophiavl_mcore.weight_sync.vllm_engine import release_engine_default_group

    engine = VllmRolloutEngine(cfg.rollout)
    release_engine_default_group()
    return engine


def build_policy(cfg: GRPOTrainConfig, info: Any) -> torch.nn.Module:
    from sophiavl_mcore.models.qwen2_5_vl import VisionOptions, build_qwen2_5_vl

    return build_qwen2_5_vl(model_dir(cfg), info, dtype=torch_dtype(cfg),
                            vision=VisionOptions(freeze=cfg.model.freeze_vision, init_seed=cfg.seed),
                            vocab_divisible_by=cfg.model.vocab_divisible_by,
                            **cfg.model.transformer_overrides())


def build_run(cfg: GRPOTrainConfig, engine: Any) -> Run:
    """Init parallel state, build + load the policy, warm start, optimizer, reference,
    weight sync and TRM client. ``engine`` is rank 0's engine (None elsewhere)."""
    from transformers import AutoTokenizer

    from sophiavl_mcore.data.images import ImageLoader
    from sophiavl_mcore.data.records import build_sampler
    from sophiavl_mcore.parallel import initialize_parallel
    from sophiavl_mcore.rewards.thinking import make_thinking_client
    from sophiavl_mcore.trainer.checkpointing import CheckpointManager, conversion_meta
    from sophiavl_mcore.trainer.optim import build_optimizer, check_backend, wrap_ddp
    from sophiavl_mcore.trainer.reference_model import ReferenceModel
    from sophiavl_mcore.trainer.setup import model_dims
    from sophiavl_mcore.trainer.sft import load_hf_weights
    from sophiavl_mcore.trainer.sft_data import image_config_for
    from sophiavl_mcore.weight_sync import MegatronWeightSync

    check_backend(cfg.optim)
    layers, heads, groups = model_dims(cfg)
    info = initialize_parallel(cfg.parallel, num_layers=layers, num_heads=heads,
                               num_query_groups=groups)
    mdir = model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(mdir))
    image_cfg = image_config_for(mdir, cfg.images)
    model = build_policy(cfg, info)
    meta = load_hf_weights(model, mdir, info, cfg.model.vocab_divisible_by)
    ddp = wrap_ddp(model, cfg.optim)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                 else tokenizer.convert_tokens_to_ids("<|im_end|>"))
    sampler = build_sampler(cfg.data)
    loader = ImageLoader(image_cfg)
    ckpt = CheckpointManager.from_config(cfg.checkpoint, conversion_meta(
        mdir, info.tp, info.pp, layers_per_stage=list(info.layers_per_stage or []) or None,
        vocab_divisible_by=cfg.model.vocab_divisible_by, dtype=cfg.model.dtype))
    resuming = cfg.checkpoint.resume != "never" and bool(ckpt.complete_steps())
    if cfg.warm_start.steps and not resuming:  # a checkpoint holds warm-started weights
        warm_start(cfg, info, ddp, tokenizer, image_cfg, sampler)
    optimizer, scheduler = build_optimizer([ddp], cfg.optim, cfg.train.total_steps)
    reference = (ReferenceModel.from_policy(model, lambda: build_policy(cfg, info),
                                            offload=cfg.reference.offload)
                 if cfg.reference.enabled else None)
    start = 1
    loaded = ckpt.resume(_ckpt_models(model, reference), optimizer, scheduler)
    if loaded is not None:
        sampler.load_state_dict(loaded.extra_state["sampler"])
        start = loaded.step + 1
        logger.info("resumed from %s: continuing at step %d", loaded.path, start)
    sync = MegatronWeightSync(model, mdir, engine, cfg.weight_sync)
    sync.sync(version=start - 1)  # the engine starts from the trainer's current policy
    trm = None
    if cfg.rewards.trust_grpo.use_thinking and info.rank == 0:
        trm = make_thinking_client(cfg.rewards.thinking, engine)
    return Run(cfg, info, model, ddp, optimizer, scheduler, reference, engine, sync, trm,
               sampler, tokenizer, loader, meta, pad_id, ckpt, start)


def _ckpt_models(model: torch.nn.Module, reference: Any) -> dict[str, torch.nn.Module]:
    models = {"model": model}
    if reference is not None:
        models["reference"] = reference.module
    return models


def save_checkpoint(run: Run, step: int) -> None:
    """Collective: model (+ reference), optimizer, scheduler, RNG, sampler position."""
    run.ckpt.save(step, _ckpt_models(run.model, run.reference), run.optimizer, run.scheduler,
                  extra_state={"sampler": run.sampler.state_dict(), "step": step,
                               "total_steps": run.cfg.train.total_steps})


def warm_start(cfg: GRPOTrainConfig, info: Any, ddp: Any, tokenizer: Any, image_cfg: Any,
               sampler: Any) -> None:
    """SFT on formatted examples (answers uniform at random when configured). Uses a
    throw-away copy of the sampler so GRPO sees the data from its beginning."""
    import copy

    from sophiavl_mcore.data.visual_task import uniform_answer_records
    from sophiavl_mcore.trainer.optim import OptimConfig, build_optimizer
    from sophiavl_mcore.trainer.sft import SFTConfig, SFTTrainer, shard_for_dp
    from sophiavl_mcore.trainer.sft_data import ExampleBuilder

    ws = cfg.warm_start
    sft = SFTConfig(global_batch_size=ws.global_batch_size, micro_batch_size=ws.micro_batch_size,
                    max_seq_len=cfg.rollout.max_model_len, train_steps=ws.steps)
    optim = OptimConfig(lr=ws.lr, min_lr=ws.lr / 10, clip_grad=1.0, decay_style="cosine")
    optimizer, scheduler = build_optimizer([ddp], optim, ws.steps)
    trainer = SFTTrainer(ddp, optimizer, scheduler, sft, optim, int(tokenizer.convert_tokens_to_ids(
        "<|im_end|>")), info.device)
    builder = ExampleBuilder(tokenizer, image_cfg, sft.max_seq_len)
    local_sampler = copy.deepcopy(sampler)
    for step in range(1, ws.steps + 1):
        records = local_sampler.next_batch(ws.global_batch_size)
        if ws.uniform_answers and cfg.task.enabled:
            records = uniform_answer_records(records, cfg.task.max_count, cfg.seed + step)
        mine = shard_for_dp(records, info.dp_rank, info.dp)
        metrics = trainer.step(builder.policy_examples(mine, cfg.prompt, lambda r: ws.reasoning))
        if step == 1 or step == ws.steps or step % 10 == 0:
            logger.info("warm start %d/%d: loss=%.4f grad_norm=%.3g", step, ws.steps,
                        metrics["train/loss"], metrics["train/grad_norm"])


# ------------------------------------------------------------------ rollout + rewards


def _load_images(run: Run, records: Sequence[Record]) -> tuple[list, list, list, list[str]]:
    """Per record: PIL image for vLLM, pixel_values, grid, expanded-prompt check."""
    from sophiavl_mcore.data.prompts import build_prompt

    batch = run.image_loader.load([r.image_path for r in records])
    pils, pvs, grids, prompts = [], [], [], []
    for i, r in enumerate(records):
        prompts.append(build_prompt(r, run.tokenizer, run.cfg.prompt))
        row = batch.image_index[i]
        if r.image_path is not None and row is None:
            logger.warning("record %s: image %s skipped (%s); prompt dropped", r.problem_id,
                           r.image_path, batch.skipped.get(i, "unknown"))
        pils.append(batch.vllm_image(i))
        pvs.append(None if row is None else batch.pixel_values[batch.patch_slice(i)].clone())
        grids.append(None if row is None else batch.image_grid_thw[row:row + 1].clone())
    return pils, pvs, grids, prompts


def _generate_and_score(run: Run, records: Sequence[Record], prompts: list[str], pils: list,
                        keep: list[int], step: int) -> dict[str, Any]:
    """Rank 0: N samples per kept prompt, outcome rewards, thinking rewards."""
    from sophiavl_mcore.rewards.outcome import OutcomeSample, score_outcomes
    from sophiavl_mcore.rewards.thinking import ThinkingRequest
    from sophiavl_mcore.rollout.interface import RolloutRequest

    reqs = [RolloutRequest(prompt=prompts[i], images=[pils[i]] if pils[i] is not None else [])
            for i in keep]
    sampling = run.cfg.rollout.sampling
    if sampling.seed is not None:  # a fresh, reproducible stream per step
        sampling = dataclasses.replace(sampling, seed=sampling.seed + 100_003 * step)
    results = run.engine.generate(reqs, sampling)
    responses, samples, think_reqs = [], [], []
    for i, res in zip(keep, results, strict=True):
        r = records[i]
        group = []
        for s in res.samples:
            group.append({"ids": s.token_ids.tolist(), "logprobs": s.logprobs.tolist(),
                          "text": s.text, "finish": s.finish_reason})
            samples.append(OutcomeSample(r.problem_type, r.solution, s.text, r.options))
            think_reqs.append(ThinkingRequest(r.problem, s.text,
                                              [pils[i]] if pils[i] is not None else []))
        responses.append((res.prompt_token_ids.tolist(), group))
    scores = score_outcomes(samples, run.cfg.rewards.format_weight)
    thinking = np.full(len(samples), np.nan)
    trm_metrics: dict[str, float] = {}
    if run.trm is not None:
        # No <think> block to grade when the format gate fails: those stay NaN.
        graded = [j for j in range(len(samples)) if scores.well_formed[j]]
        if graded:
            ts = run.trm.score([think_reqs[j] for j in graded])
            thinking[graded] = ts.scores
            trm_metrics = ts.metrics("reward/trm")
            trm_metrics["reward/trm_failures"] = float(sum(ts.failures.values()))
    return {"responses": responses, "outcome": scores.reward, "accuracy": scores.accuracy,
            "well_formed": scores.well_formed.astype(np.float64), "thinking": thinking,
            "trm_metrics": trm_metrics}


def rollout_step(run: Run, records: Sequence[Record], step: int) -> Rollout:
    """Generate + score on rank 0, broadcast; every rank returns the same Rollout."""
    pils, pvs, grids, prompts = _load_images(run, records)
    keep = [i for i, r in enumerate(records) if r.image_path is None or pvs[i] is not None]
    box: list[Any] = [None]
    if run.info.rank == 0:
        try:
            box[0] = _generate_and_score(run, records, prompts, pils, keep, step)
        except Exception as err:  # every rank must leave the broadcast
            box[0] = {"error": repr(err)}
            logger.exception("rollout failed")
    dist.broadcast_object_list(box, src=0)
    out = box[0]
    if "error" in out:
        raise RuntimeError(f"rollout on rank 0 failed: {out['error']}")
    return Rollout([records[i] for i in keep], [p for p, _ in out["responses"]],
                   [pvs[i] for i in keep], [grids[i] for i in keep],
                   [g for _, g in out["responses"]], out["outcome"], out["accuracy"],
                   out["well_formed"], out["thinking"], out["trm_metrics"],
                   [pils[i] for i in keep])


def to_batch(run: Run, roll: Rollout, advantages: np.ndarray) -> RolloutBatch:
    """All responses of the step as one RolloutBatch (group-major order)."""
    prompt_ids, response_ids, lps, pvs, grids, groups, types = [], [], [], [], [], [], []
    masks = []
    # The engine does not sample these (sampling.forbid_vision_tokens); masking them here
    # too keeps an engine without that guarantee from feeding image slots to the model.
    vision = torch.tensor(vision_token_ids(run.tokenizer))
    for g, (pids, group) in enumerate(zip(roll.prompt_ids, roll.responses, strict=True)):
        p = torch.tensor(pids, dtype=torch.long)
        for s in group:
            ids = s["ids"] or [run.pad_id]  # an empty reply still needs one scored position
            prompt_ids.append(p)
            rid = torch.tensor(ids, dtype=torch.long)
            # A sampled vision token would read as an image placeholder without an image
            # (M-RoPE / vision merge): feed a pad there and leave it out of the loss.
            bad = torch.isin(rid, vision)
            response_ids.append(torch.where(bad, run.pad_id, rid))
            masks.append(~bad)
            lp = s["logprobs"] if s["ids"] else [0.0]
            lps.append(torch.tensor(lp, dtype=torch.float32))
            pvs.append(roll.pixel_values[g])
            grids.append(roll.grids[g])
            groups.append(g)
            types.append(roll.records[g].problem_type)
    return RolloutBatch(prompt_ids, response_ids, torch.as_tensor(advantages, dtype=torch.float32),
                        torch.tensor(groups), types, response_mask=masks, rollout_logprobs=lps,
                        pixel_values=pvs,
                        image_grid_thw=grids, pad_id=run.pad_id)


def train_on_batch(run: Run, batch: RolloutBatch, timer: Any) -> dict[str, float]:
    """Old + reference log-probs, then one GRPO update on this rank's DP share."""
    from sophiavl_mcore.trainer.grpo_step import compute_logprobs, grpo_train_step

    local = batch.shard(run.info.dp_rank, run.info.dp)
    mbs, temp = run.cfg.train.micro_batch_size, run.cfg.rollout.sampling.temperature
    with timer("old_logprobs"):
        local.old_logprobs = compute_logprobs(run.ddp, local, mbs, temp).logprobs
    if run.reference is not None:
        with timer("ref_logprobs"):
            local.ref_logprobs = run.reference.compute_logprobs(local, mbs, temp).logprobs
    with timer("train"):
        return grpo_train_step(run.ddp, run.optimizer, run.scheduler, local, run.cfg.loss, mbs, temp)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def export(run: Run) -> Path | None:
    """Save the final Megatron shards and the HF export under ``output_dir/final``."""
    from sophiavl_mcore.trainer.sft import save_and_export

    _, hf = save_and_export(run.model, run.info, run.meta, Path(run.cfg.output_dir) / "final",
                            source_hf_dir=model_dir(run.cfg))
    return hf
