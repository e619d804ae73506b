"""Supervised fine-tuning step on the Megatron stack (TRM training, policy warm start).

One global batch of :class:`SFTExample` (each DP rank holds its share) →

    right-padded micro-batches  input_ids [B,S], labels [B,S] (= input_ids shifted left),
                                loss_mask [B,S] (1 on positions whose *next* token is a
                                target token), pixel_values [P, 3·2·14·14],
                                image_grid_thw [I, 3]
    ─► Megatron's schedule (:func:`~sophiavl_mcore.trainer.schedule.run_schedule`; the
       PP schedule when pp > 1), the model's vocab-parallel per-token cross-entropy [B,S]
       (nats)
    ─► loss = Σ_{target tokens of the global batch} CE / (number of those tokens)
       (token mean over the *global* batch, not a mean of micro-batch means)
    ─► Megatron optimizer update (grad clip, LR schedule; see :mod:`~sophiavl_mcore.trainer.optim`).

Scaling: Megatron divides each micro-batch loss by the number of micro-batches and DDP
averages gradients over DP, so each micro-batch contributes
``Σ CE · num_microbatches · dp / global_target_tokens``; the resulting gradient is that
of the global token mean exactly, whatever the split over micro-batches and DP ranks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar, cast

import torch

from sophiavl_mcore.parallel.collectives import dp_sum, from_last_stage_floats
from sophiavl_mcore.trainer.collate import SFTExample, SFTMicroBatch, collate
from sophiavl_mcore.trainer.config import OptimConfig
from sophiavl_mcore.trainer.optim import StepResult, optimizer_step
from sophiavl_mcore.trainer.schedule import LossFunc, run_schedule
from sophiavl_mcore.trainer.sft.config import SFTConfig

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

logger = logging.getLogger(__name__)


T = TypeVar("T")


def shard_for_dp(items: Sequence[T], dp_rank: int, dp: int) -> list[T]:
    """This data-parallel rank's share of a global batch (contiguous blocks)."""
    if len(items) % dp:
        raise ValueError(f"global batch of {len(items)} does not split over dp={dp} ranks")
    per = len(items) // dp
    return list(items[dp_rank * per:(dp_rank + 1) * per])


def _to_device(mb: SFTMicroBatch, device: torch.device) -> SFTMicroBatch:
    return cast(SFTMicroBatch, {k: v.to(device, non_blocking=True)
                                if isinstance(v, torch.Tensor) else v for k, v in mb.items()})


class SFTTrainer:
    """Runs SFT updates of one Megatron model (one pipeline chunk per rank).

    Args:
        ddp_model: the model wrapped by :func:`~sophiavl_mcore.trainer.optim.wrap_ddp`.
        optimizer, scheduler: from :func:`~sophiavl_mcore.trainer.optim.build_optimizer`.
        cfg: batch geometry; ``optim``: for the clip value.
        pad_id: token id used for padding.
        device: where micro-batches go (``ParallelInfo.device``).
    """

    def __init__(self, ddp_model: DistributedDataParallel, optimizer: MegatronOptimizer,
                 scheduler: OptimizerParamScheduler, cfg: SFTConfig, optim: OptimConfig,
                 pad_id: int, device: torch.device) -> None:
        from megatron.core import parallel_state

        self.model = ddp_model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.cfg = cfg
        self.optim = optim
        self.pad_id = pad_id
        self.device = device
        self.dp = parallel_state.get_data_parallel_world_size()
        cfg.check_dp(self.dp)

    # -- helpers -----------------------------------------------------------------------

    def micro_batches(self, local: Sequence[SFTExample]) -> list[SFTMicroBatch]:
        """Split this DP rank's examples into collated micro-batches."""
        mbs = self.cfg.micro_batch_size
        return [collate(local[i:i + mbs], self.pad_id, self.cfg.pad_to_multiple_of)
                for i in range(0, len(local), mbs)]

    def _placeholder(self) -> SFTExample:
        """A fully masked example for a rank whose share is empty (every image skipped)."""
        ids = torch.full((2,), self.pad_id, dtype=torch.long)
        ex = SFTExample(ids, torch.tensor([False, True]), source="<placeholder>")
        ex.target_mask = torch.zeros(2, dtype=torch.bool)  # contributes no loss, no tokens
        return ex

    # -- the step ------------------------------------------------------------------------

    def run_batch(self, local: Sequence[SFTExample], forward_only: bool = False
                  ) -> dict[str, float]:
        """Forward (and backward unless ``forward_only``) of one global batch.

        ``local``: this DP rank's examples (may be empty when every image was skipped).
        Returns ``loss`` (global token-mean CE, nats), ``target_tokens`` and
        ``input_tokens`` (global sums), identical on every rank. Gradients are left in
        the DDP buffers (reduced over DP) for the optimizer.
        """
        if local:
            return self.run_micro_batches(self.micro_batches(local), forward_only)
        out = self.run_micro_batches(self.micro_batches([self._placeholder()]), forward_only)
        return out

    def run_micro_batches(self, mbs: Sequence[SFTMicroBatch], forward_only: bool = False
                          ) -> dict[str, float]:
        """:meth:`run_batch` on already collated micro-batches (see :func:`collate`)."""
        local_targets = float(sum(float(mb["loss_mask"].sum()) for mb in mbs))
        local_inputs = float(sum(mb["num_input_tokens"] for mb in mbs))
        global_targets, global_inputs = dp_sum([local_targets, local_inputs])
        if global_targets <= 0:
            raise ValueError("SFT batch without any target token on any data-parallel rank")
        scale = len(mbs) * self.dp / global_targets

        def forward_step(data_iterator: Iterator[SFTMicroBatch], model: torch.nn.Module
                         ) -> tuple[torch.Tensor, LossFunc]:
            mb = _to_device(next(data_iterator), self.device)
            output = model(mb["input_ids"], pixel_values=mb["pixel_values"],
                           image_grid_thw=mb["image_grid_thw"], labels=mb["labels"])

            def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                token_sum = (per_token.float() * mb["loss_mask"]).sum()
                return token_sum * scale, {"token_sum": token_sum.detach()}

            return output, loss_func

        if not forward_only:
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
        store = run_schedule(self.model, mbs, forward_step, forward_only=forward_only,
                             seq_length=max(mb["input_ids"].shape[1] for mb in mbs),
                             micro_batch_size=max(mb["input_ids"].shape[0] for mb in mbs))
        local_sum = float(sum(float(d["token_sum"]) for d in store)) if store else 0.0
        (loss_sum,) = from_last_stage_floats(dp_sum([local_sum]))
        return {"loss": loss_sum / global_targets, "target_tokens": global_targets,
                "input_tokens": global_inputs}

    def step(self, local: Sequence[SFTExample]) -> dict[str, float]:
        """One optimizer update on a global batch; ``local`` is this DP rank's share.

        Returns ``train/loss`` (token-mean CE before the update, nats), ``train/grad_norm``
        (global L2, before clipping), ``train/lr`` (used for this update),
        ``train/target_tokens``, ``perf/tokens_per_s`` (non-padding input tokens of the
        global batch per second of this step), ``perf/step_time_s``.
        """
        start = time.perf_counter()
        out = self.run_batch(local)
        result: StepResult = optimizer_step(self.optimizer, self.scheduler, self.optim.clip_grad)
        elapsed = time.perf_counter() - start
        return {
            "train/loss": out["loss"],
            "train/grad_norm": result.grad_norm,
            "train/lr": result.lr,
            "train/target_tokens": out["target_tokens"],
            "train/update_ok": float(result.update_successful),
            "perf/tokens_per_s": out["input_tokens"] / elapsed,
            "perf/step_time_s": elapsed,
        }

    @torch.no_grad()
    def evaluate(self, local: Sequence[SFTExample]) -> float:
        """Global token-mean loss of a batch without touching gradients or weights."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.run_batch(local, forward_only=True)["loss"]
        finally:
            self.model.train(was_training)
