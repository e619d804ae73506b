"""The Trust-GRPO trainer: typed components, one method per phase of a step.

    rollout  → this rank's engine answers its prompts (N samples each)
    score    → R^o, R^t (TRM), γ, annealing, advantages of the engine's own groups
    exchange → responses to the trainer's data-parallel layout as tensors
    update   → reference log-probs, PPO-clip + KL update on this rank's share
    sync     → Megatron shards into every engine (one policy version everywhere)

Placement: every rank holds one rank of an SPMD vLLM engine
(:mod:`~sophiavl_mcore.rollout.layout`). All ranks sample the same prompts (the sampler
is deterministic); engine ``e`` answers its contiguous slice of whole groups.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from sophiavl_mcore.data.records import Record
from sophiavl_mcore.parallel.collectives import host_all_gather, host_all_reduce
from sophiavl_mcore.rewards.stage import score_groups
from sophiavl_mcore.rollout.batch import StepBatch
from sophiavl_mcore.rollout.exchange import plan_transfers, redistribute
from sophiavl_mcore.rollout.interface import RolloutResult
from sophiavl_mcore.rollout.layout import EngineLayout
from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig
from sophiavl_mcore.trainer.grpo.rollout_batch import RolloutBatch
from sophiavl_mcore.trainer.grpo.step_data import build_requests, engine_batch, to_rollout_batch
from sophiavl_mcore.trainer.setup import model_dir

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from torch.distributed import ProcessGroup
    from transformers import PreTrainedTokenizerBase

    from sophiavl_mcore.checkpoint.training import CheckpointManager
    from sophiavl_mcore.data.images import ImageLoader
    from sophiavl_mcore.data.records import MixedSampler
    from sophiavl_mcore.parallel import ParallelInfo
    from sophiavl_mcore.rewards.thinking import ThinkingRewardClient
    from sophiavl_mcore.rewards.trm_server import LocalTRM
    from sophiavl_mcore.rollout.interface import RolloutEngine
    from sophiavl_mcore.trainer.grpo.config import GRPOLossConfig
    from sophiavl_mcore.trainer.grpo.metrics import PhaseTimer
    from sophiavl_mcore.trainer.grpo.reference_model import ReferenceModel
    from sophiavl_mcore.weight_sync.interface import WeightSync

logger = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class GRPOTrainer:
    """A built run on this rank (see :func:`~sophiavl_mcore.trainer.grpo.build.build_trainer`)."""

    cfg: GRPOTrainConfig
    info: ParallelInfo
    layout: EngineLayout
    model: torch.nn.Module
    ddp: DistributedDataParallel
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    reference: ReferenceModel | None
    engine: RolloutEngine
    sync_: WeightSync
    trm: ThinkingRewardClient | None
    sampler: MixedSampler
    tokenizer: PreTrainedTokenizerBase
    image_loader: ImageLoader
    ckpt: CheckpointManager
    meta: dict[str, Any]
    pad_id: int
    vision_ids: torch.Tensor
    engine_group: ProcessGroup | None = None  # this rank's engine (RTP > 1)
    start_step: int = 1
    trm_server: LocalTRM | None = None  # the TRM server this job started (rewards.trm.serve)

    @property
    def engine_index(self) -> int:
        return self.layout.engine_of(self.info.rank)

    # ------------------------------------------------------------------ rollout

    def rollout(self, records: list[Record], step: int, *, active: bool = True,
                round_index: int = 0) -> StepBatch:
        """This rank's engine answers its slice of ``records`` (``n`` samples each);
        ``active=False``: the engine sits this round out (no group generated)."""
        self.engine.wake_up()  # GPU: weights and KV cache back from sleep (no-op on CPU)
        span = self.layout.prompt_range(self.engine_index)
        mine = records[span.start:span.stop]
        loaded = self.image_loader.load([r.image_path for r in mine] if active else [])
        requests, keep, images = build_requests(mine if active else [], loaded, self.tokenizer,
                                                self.cfg.prompt, "its group is not trained")
        images += [None] * (len(mine) - len(images))
        sampling = self.cfg.rollout.sampling
        if sampling.seed is not None:  # a fresh, reproducible stream per step and engine
            sampling = dataclasses.replace(sampling, seed=sampling.seed + 100_003 * step
                                           + 7919 * self.engine_index + 131 * round_index)
        results: list[RolloutResult | None] = [None] * len(mine)
        for i, res in zip(keep, self.engine.generate(requests, sampling), strict=True):
            results[i] = res
        return engine_batch(span.start, mine, results, images, sampling.n, self.pad_id)

    # ------------------------------------------------------------------ score

    def score(self, batch: StepBatch, step: int) -> None:
        """Adds R^o, R^t, Trust-GRPO and advantages to this engine's ``batch``
        (:func:`~sophiavl_mcore.rewards.stage.score_groups`). With RTP > 1 only the
        engine's leader asks the TRM and broadcasts R^t to the engine's other ranks —
        unless the client's scoring is collective over the engine's ranks
        (:attr:`~sophiavl_mcore.rewards.thinking.ThinkingRewardClient.collective`)."""
        leader = self.layout.leader(self.engine_index)
        shared = self.layout.rtp > 1 and self.trm is not None and not self.trm.collective

        def agree(thinking: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(thinking, dtype=np.float64))
            dist.broadcast(t, src=leader, group=self.engine_group)
            return t.numpy()

        ask = self.trm if (not shared or self.info.rank == leader) else None
        score_groups(batch, ask, self.cfg.rewards, step=step - 1,
                     total_steps=self.cfg.train.total_steps, agree=agree if shared else None)

    # ------------------------------------------------------------------ exchange + update

    def exchange(self, batch: StepBatch, records: list[Record]
                 ) -> tuple[RolloutBatch, dict[str, float]]:
        """This rank's DP share of the step as a RolloutBatch, and what moved: bytes this
        rank received, and over the step the rows trained with their index sums (each
        response exactly once ⇔ count N, Σi = N(N−1)/2, Σi² = (N−1)N(2N−1)/6).
        ``records``: the step's, every engine's groups in order."""
        gathered = host_all_gather(torch.tensor([self.info.dp_rank]))
        plan = plan_transfers(self.layout, [int(t) for t in gathered], self.info.dp)
        first = self.layout.response_range(self.engine_index).start
        index, share, received = redistribute(batch, first, plan, self.info.rank, records)
        images = self.image_loader.load([r.image_path for r in share.records])
        forbidden = self.vision_ids.tolist() if self.cfg.rollout.sampling.forbid_vision_tokens else ()
        local = to_rollout_batch(share, images, self.vision_ids, self.pad_id, forbidden)
        idx = np.asarray(index, dtype=np.float64)
        moved = torch.tensor([idx.size, idx.sum(), (idx ** 2).sum(), float(received)],
                             dtype=torch.float64)
        host_all_reduce(moved)
        replicas = self.info.tp * self.info.pp  # every rank of a DP replica holds its share
        return local, {"rollout/rows_trained": float(moved[0]) / replicas,
                       "rollout/rows_index_sum": float(moved[1]) / replicas,
                       "rollout/rows_index_sumsq": float(moved[2]) / replicas,
                       "rollout/exchange_bytes_mean": float(moved[3]) / self.info.world_size,
                       "rollout/exchange_bytes_rank": float(received)}

    def update(self, batch: RolloutBatch, timer: PhaseTimer) -> dict[str, float]:
        """``train.updates_per_rollout`` PPO-clip + KL updates on this rank's share."""
        self.engine.sleep()  # GPU: the engine's memory goes to the trainer (no-op on CPU)
        c = self.cfg
        return ppo_updates(self.ddp, self.optimizer, self.scheduler, self.reference, batch,
                           c.loss, updates=c.train.updates_per_rollout,
                           micro_batch_size=c.train.micro_batch_size,
                           logprob_micro_batch_size=c.train.logprob_micro_batch_size,
                           temperature=c.rollout.sampling.temperature, timer=timer)

    # ------------------------------------------------------------------ sync, save, export

    def sync(self, step: int) -> dict[str, float]:
        """Every engine takes the updated weights; bytes received per rank (max)."""
        report = self.sync_.sync(version=step)
        worst = torch.tensor([report.bytes_received], dtype=torch.float64)
        host_all_reduce(worst, op=dist.ReduceOp.MAX)
        return {"weight_sync/bytes_max_rank": float(worst), "weight_sync/bytes_rank": float(
            report.bytes_received), "weight_sync/bytes_model": float(self.sync_.bytes_model),
            "weight_sync/seconds": report.seconds, "weight_sync/policy_version": float(step)}

    def save(self, step: int) -> None:
        """Collective: model (+ reference), optimizer, scheduler, RNG, sampler position."""
        self.ckpt.save(step, self.checkpoint_models(), self.optimizer, self.scheduler,
                       extra_state={"sampler": self.sampler.state_dict(), "step": step,
                                    "total_steps": self.cfg.train.total_steps})

    def checkpoint_models(self) -> dict[str, torch.nn.Module]:
        models = {"model": self.model}
        if self.reference is not None:
            models["reference"] = self.reference.module
        return models

    def export(self) -> Path:
        """Final Megatron shards and the HF export under ``output_dir/final`` (``mcore``,
        ``hf``; collective, atomic: :func:`~sophiavl_mcore.checkpoint.hf.export_hf`)."""
        from sophiavl_mcore.checkpoint.hf import export_hf

        final = Path(self.cfg.output_dir) / "final"
        return export_hf(self.model, final / "hf", source_hf_dir=model_dir(self.cfg),
                         model_meta=self.meta, mcore_dir=final / "mcore")

    def close(self) -> None:
        from sophiavl_mcore.parallel import destroy_parallel
        from sophiavl_mcore.rollout.spmd import close_spmd_engine

        if self.trm is not None:
            self.trm.close()
        if self.trm_server is not None:
            self.trm_server.stop()
        close_spmd_engine(self.engine)
        destroy_parallel(keep_process_group=True)


def ppo_updates(ddp: DistributedDataParallel, optimizer: MegatronOptimizer,
                scheduler: OptimizerParamScheduler, reference: ReferenceModel | None,
                batch: RolloutBatch, loss_cfg: GRPOLossConfig, *, updates: int,
                micro_batch_size: int, temperature: float,
                timer: PhaseTimer | None = None,
                logprob_micro_batch_size: int = 0) -> dict[str, float]:
    """Reference (and, for several updates, old) log-probs of ``batch`` (this rank's
    share; ``logprob_micro_batch_size`` responses per forward, 0 = ``micro_batch_size``), then ``updates`` optimizer steps on consecutive mini-batches of it.

    One update: no old-log-prob pass — the ratio is taken against the training
    forward's own log-probs, detached (exactly 1, as a separate pass would give on the
    same weights). Several: old log-probs once, before the first update, so later
    mini-batches see a moved policy and the clip acts."""
    from sophiavl_mcore.trainer.grpo.metrics import PhaseTimer
    from sophiavl_mcore.trainer.grpo.step import compute_logprobs, grpo_train_step

    timer = timer or PhaseTimer()
    if updates < 1 or len(batch) % updates:
        raise ValueError(f"{len(batch)} responses on this rank do not split into "
                         f"updates_per_rollout={updates} equal mini-batches")
    no_grad_mbs = logprob_micro_batch_size or micro_batch_size
    if updates > 1:
        with timer("old_logprobs"):
            batch.old_logprobs = compute_logprobs(ddp, batch, no_grad_mbs, temperature).logprobs
    if reference is not None:
        with timer("ref_logprobs"):
            batch.ref_logprobs = reference.compute_logprobs(batch, no_grad_mbs, temperature).logprobs
    per = len(batch) // updates
    with timer("train"):
        steps = [grpo_train_step(ddp, optimizer, scheduler, batch.select(range(i * per, (i + 1) * per)),
                                 loss_cfg, micro_batch_size, temperature) for i in range(updates)]
    return merge_update_metrics(steps)


def merge_update_metrics(steps: list[dict[str, float]]) -> dict[str, float]:
    """One dict for the step's updates: the first update's loss (before any change)
    and engine parity, maxima of maxima, means of the rest, the last learning rate."""
    if len(steps) == 1:
        return dict(steps[0], **{"train/updates": 1.0})
    out = {key: float(np.mean([s[key] for s in steps])) for key in steps[0]}
    for key in ("train/loss", "train/logprob_mismatch", "train/logprob_mismatch_max"):
        out[key] = steps[0][key]
    for key in ("train/ratio_max", "train/grad_norm"):
        out[key] = max(s[key] for s in steps)
    out["train/lr"] = steps[-1]["train/lr"]
    out["train/response_tokens"] = float(sum(s["train/response_tokens"] for s in steps))
    out["train/input_tokens"] = float(sum(s["train/input_tokens"] for s in steps))
    out["train/updates"] = float(len(steps))
    return out


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
