"""Everything before step 1: the world, the engines, the policy, its optimizer and
reference, the weight sync and the TRM client → a :class:`GRPOTrainer`.

Order: rank 0 writes the tiny model and the task (no group exists yet); the trainer's
world and Megatron's groups come next; then every rank builds its share of an SPMD
vLLM engine inside that world (:mod:`~sophiavl_mcore.rollout.spmd`); then the policy,
whose first weight sync makes every engine serve the trainer's weights.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from sophiavl_mcore.parallel.collectives import run_on_rank
from sophiavl_mcore.parallel.host import init_host_group
from sophiavl_mcore.rollout.layout import EngineLayout, check_engine_layout
from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig
from sophiavl_mcore.trainer.grpo.trainer import GRPOTrainer
from sophiavl_mcore.trainer.setup import (
    check_world,
    model_config,
    model_dims,
    model_dir,
    prepare_files,
    torch_dtype,
)

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from torch.distributed import ProcessGroup
    from transformers import PreTrainedTokenizerBase

    from sophiavl_mcore.data.images import ImageConfig
    from sophiavl_mcore.data.records import MixedSampler
    from sophiavl_mcore.parallel import ParallelInfo
    from sophiavl_mcore.rewards.thinking import ThinkingRewardClient, ThinkingRewardConfig
    from sophiavl_mcore.rollout.interface import RolloutEngine

logger = logging.getLogger(__name__)


def engine_layout(cfg: GRPOTrainConfig, world: int) -> EngineLayout:
    """The rollout layout for ``world`` ranks, validated (every number in the error)."""
    _, heads, kv_heads = model_dims(cfg)
    if cfg.model.tiny:
        from sophiavl_mcore.trainer.setup import tiny_spec

        vision_heads = tiny_spec(cfg).vision_heads
    else:
        vision_heads = (model_config(cfg).get("vision_config") or {}).get("num_heads")
    per_node = os.environ.get("LOCAL_WORLD_SIZE")
    return check_engine_layout(world, cfg.rollout.tensor_parallel_size, cfg.train.prompts_per_step,
                               cfg.rollout.sampling.n, num_heads=heads, num_kv_heads=kv_heads,
                               vision_heads=vision_heads,
                               ranks_per_node=int(per_node) if per_node else None)


def build_policy(cfg: GRPOTrainConfig, info: ParallelInfo) -> torch.nn.Module:
    from sophiavl_mcore.models.qwen2_5_vl import VisionOptions, build_qwen2_5_vl

    return build_qwen2_5_vl(model_dir(cfg), info, dtype=torch_dtype(cfg),
                            vision=VisionOptions(freeze=cfg.model.freeze_vision, init_seed=cfg.seed),
                            vocab_divisible_by=cfg.model.vocab_divisible_by,
                            **cfg.model.transformer_overrides())


def _engine_groups(layout: EngineLayout, rank: int) -> ProcessGroup | None:
    """This rank's engine as a torch process group (collective; None when RTP = 1)."""
    if layout.rtp == 1:
        return None
    mine = None
    for e in range(layout.num_engines):
        group = dist.new_group(layout.ranks_of(e), backend="gloo")  # host tensors
        if layout.engine_of(rank) == e:
            mine = group
    return mine


def build_trainer(cfg: GRPOTrainConfig) -> GRPOTrainer:
    """Collective over the job's ranks (``torchrun``)."""
    from transformers import AutoTokenizer

    from sophiavl_mcore.checkpoint.convert import conversion_meta
    from sophiavl_mcore.checkpoint.hf import load_hf_weights
    from sophiavl_mcore.checkpoint.training import CheckpointManager
    from sophiavl_mcore.data.images import ImageLoader
    from sophiavl_mcore.data.records import build_sampler
    from sophiavl_mcore.parallel import initialize_parallel
    from sophiavl_mcore.rewards.trm_server import serve_trm
    from sophiavl_mcore.rollout.interface import vision_token_ids
    from sophiavl_mcore.rollout.spmd import build_spmd_engine
    from sophiavl_mcore.trainer.grpo.reference_model import ReferenceModel
    from sophiavl_mcore.trainer.optim import build_optimizer, check_backend, wrap_ddp
    from sophiavl_mcore.trainer.sft.data import image_config_for
    from sophiavl_mcore.weight_sync.megatron_sync import MegatronWeightSync

    world = int(os.environ.get("WORLD_SIZE", cfg.parallel.tp * cfg.parallel.pp))
    check_world(cfg, world)
    layout = engine_layout(cfg, world)
    cfg = prepare_files(cfg)
    # The run's own TRM server boots (rank 0) while the policy and its engine are built.
    cfg, trm_server = serve_trm(cfg)
    check_backend(cfg.optim)
    layers, heads, groups = model_dims(cfg)
    info = initialize_parallel(cfg.parallel, num_layers=layers, num_heads=heads,
                               num_query_groups=groups)
    init_host_group()
    dist.barrier()  # rank 0's files are written
    logger.info("%s", layout.describe())
    engine = build_spmd_engine(cfg.rollout, layout)
    engine_group = _engine_groups(layout, info.rank)
    mdir = model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(mdir))
    image_cfg = image_config_for(mdir, cfg.images)
    model = build_policy(cfg, info)
    meta = load_hf_weights(model, mdir, info, cfg.model.vocab_divisible_by)
    ddp = wrap_ddp(model, cfg.optim)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                 else tokenizer.convert_tokens_to_ids("<|im_end|>"))
    sampler = build_sampler(cfg.data)
    ckpt = CheckpointManager.from_config(cfg.checkpoint, conversion_meta(
        mdir, info.tp, info.pp, layers_per_stage=list(info.layers_per_stage or []) or None,
        vocab_divisible_by=cfg.model.vocab_divisible_by, dtype=cfg.model.dtype))
    resuming = cfg.checkpoint.resume != "never" and bool(ckpt.complete_steps())
    if cfg.warm_start.steps and not resuming:  # a checkpoint holds warm-started weights
        warm_start(cfg, info, ddp, tokenizer, image_cfg, sampler)
    optimizer, scheduler = build_optimizer([ddp], cfg.optim, cfg.optimizer_updates)
    reference = (ReferenceModel.from_policy(model, lambda: build_policy(cfg, info),
                                            offload=cfg.reference.offload)
                 if cfg.reference.enabled else None)
    start = 1
    models = {"model": model, **({"reference": reference.module} if reference else {})}
    loaded = ckpt.resume(models, optimizer, scheduler)
    if loaded is not None:
        sampler.load_state_dict(loaded.extra_state["sampler"])
        start = loaded.step + 1
        logger.info("resumed from %s: continuing at step %d", loaded.path, start)
    sync = MegatronWeightSync(model, mdir, engine, cfg.weight_sync)  # every rank holds an engine
    sync.sync(version=start - 1)  # every engine starts from the trainer's current policy
    if trm_server is not None:  # rank 0 polls /health; the others wait for its outcome
        run_on_rank(trm_server.wait_healthy)
    trm = (thinking_client(cfg.rewards.thinking, engine)
           if cfg.rewards.trust_grpo.use_thinking else None)
    return GRPOTrainer(cfg=cfg, info=info, layout=layout, model=model, ddp=ddp,
                       optimizer=optimizer, scheduler=scheduler, reference=reference,
                       engine=engine, sync_=sync, trm=trm, sampler=sampler, tokenizer=tokenizer,
                       image_loader=ImageLoader(image_cfg), ckpt=ckpt, meta=meta, pad_id=pad_id,
                       vision_ids=torch.tensor(vision_token_ids(tokenizer)),
                       engine_group=engine_group, start_step=start, trm_server=trm_server)


def thinking_client(cfg: ThinkingRewardConfig, engine: RolloutEngine) -> ThinkingRewardClient:
    """The configured TRM client (``rewards.thinking``: a ThinkingRewardConfig): ``http``
    asks an OpenAI-compatible server, ``in_process`` grades on ``engine`` (this rank's
    rollout engine)."""
    from sophiavl_mcore.rewards.thinking import InProcessThinkingClient
    from sophiavl_mcore.rewards.trm_http import VllmServerThinkingClient

    if cfg.backend == "http":
        return VllmServerThinkingClient(cfg)
    return InProcessThinkingClient(engine, cfg)


def warm_start(cfg: GRPOTrainConfig, info: ParallelInfo, ddp: DistributedDataParallel,
               tokenizer: PreTrainedTokenizerBase, image_cfg: ImageConfig,
               sampler: MixedSampler) -> None:
    """SFT on formatted examples (answers uniform at random when configured). Uses a
    throw-away copy of the sampler so GRPO sees the data from its beginning."""
    from sophiavl_mcore.data.visual_task import uniform_answer_records, warm_start_reasoning_for
    from sophiavl_mcore.trainer.config import OptimConfig
    from sophiavl_mcore.trainer.optim import build_optimizer
    from sophiavl_mcore.trainer.sft.config import SFTConfig
    from sophiavl_mcore.trainer.sft.data import ExampleBuilder
    from sophiavl_mcore.trainer.sft.trainer import SFTTrainer, shard_for_dp

    ws = cfg.warm_start
    sft = SFTConfig(global_batch_size=ws.global_batch_size, micro_batch_size=ws.micro_batch_size,
                    max_seq_len=cfg.rollout.max_model_len, train_steps=ws.steps)
    optim = OptimConfig(lr=ws.lr, min_lr=ws.lr / 10, clip_grad=1.0, decay_style="cosine")
    optimizer, scheduler = build_optimizer([ddp], optim, ws.steps)
    trainer = SFTTrainer(ddp, optimizer, scheduler, sft, optim, int(tokenizer.convert_tokens_to_ids(
        "<|im_end|>")), info.device)
    builder = ExampleBuilder(tokenizer, image_cfg, sft.max_seq_len)
    local_sampler = copy.deepcopy(sampler)
    reasoning = warm_start_reasoning_for(cfg.task, ws.reasoning)
    for step in range(1, ws.steps + 1):
        records = local_sampler.next_batch(ws.global_batch_size)
        if ws.uniform_answers and cfg.task.enabled:
            records = uniform_answer_records(records, cfg.task.max_count, cfg.seed + step)
        mine = shard_for_dp(records, info.dp_rank, info.dp)
        metrics = trainer.step(builder.policy_examples(mine, cfg.prompt, reasoning))
        if step == 1 or step == ws.steps or step % 10 == 0:
            logger.info("warm start %d/%d: loss=%.4f grad_norm=%.3g", step, ws.steps,
                        metrics["train/loss"], metrics["train/grad_norm"])
