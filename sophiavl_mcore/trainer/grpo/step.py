"""Old / reference log-probs and the GRPO update, through Megatron's pipeline schedule.

Both entry points run Megatron's schedule through
:func:`~sophiavl_mcore.trainer.schedule.run_schedule` over the length-sorted,
right-padded micro-batches of a :class:`~sophiavl_mcore.trainer.grpo.rollout_batch.RolloutBatch`
(one data-parallel rank's share).

On the last pipeline stage the model returns vocab-parallel logits ``[B, S, V_pad/TP]``;
:func:`~sophiavl_mcore.trainer.logprobs.vocab_parallel_logprobs_and_entropy` turns them
into per-token log-probs of the sampled tokens (temperature applied as vLLM does, padded
vocabulary columns ≥ the HF vocabulary size excluded) without gathering the vocabulary.

**Where results live.** :func:`compute_logprobs` computes on the last stage (identically
on each of its TP ranks) and, by default, broadcasts the per-token values over the
pipeline group, so every rank of the DP replica returns them: one fp32 vector of the
share's response tokens (e.g. 512 responses × 1k tokens = 2 MB), negligible next to one
micro-batch's activations, and it spares the loop any "which stage am I" logic.
:func:`grpo_train_step` returns metrics that are identical on every rank.

**Loss scaling.** :func:`~sophiavl_mcore.trainer.grpo.loss.grpo_loss` normalises each
micro-batch by the *global* token (or sequence) count of the step, all-reduced over DP
first. Megatron divides a 2-tuple loss by the number of micro-batches and DDP averages
gradients over DP, so the loss handed to the schedule is ``loss · n_micro · dp / cp``;
the sum of the gradients is then exactly the gradient of the global token mean. The
vision tower's gradients are averaged over TP by ``finalize_model_grads`` (its
parameters carry ``average_gradients_across_tp_domain``; see ``models.vision``), which the
schedule calls because :func:`~sophiavl_mcore.trainer.optim.wrap_ddp` installs it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from sophiavl_mcore.models.unwrap import unwrap_model
from sophiavl_mcore.parallel.collectives import dp_all_reduce, from_last_stage
from sophiavl_mcore.trainer.grpo.config import GRPOLossConfig
from sophiavl_mcore.trainer.grpo.loss import grpo_loss
from sophiavl_mcore.trainer.grpo.rollout_batch import (
    MicroBatch,
    RolloutBatch,
    extract_per_token,
)
from sophiavl_mcore.trainer.logprobs import DEFAULT_CHUNK_SIZE, vocab_parallel_logprobs_and_entropy
from sophiavl_mcore.trainer.optim import optimizer_step
from sophiavl_mcore.trainer.schedule import ForwardStep, LossFunc, run_schedule

if TYPE_CHECKING:
    from types import ModuleType

    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from torch.distributed import ProcessGroup

__all__ = ["TokenLogProbs", "compute_logprobs", "grpo_train_step"]

# grpo_loss metrics averaged over response tokens (weighted by each micro-batch's count)
_MEAN_KEYS = ("train/pg_loss", "train/kl", "train/entropy", "train/clip_fraction",
              "train/ratio_mean", "train/approx_kl_old")


@dataclasses.dataclass
class TokenLogProbs:
    """Per-response fp32 ``[R_i]`` log-probs (nats) and, when asked, entropies (nats)."""

    logprobs: list[torch.Tensor]
    entropy: list[torch.Tensor] | None = None


# ------------------------------------------------------------------------ helpers


def _mpu() -> ModuleType:
    from megatron.core import parallel_state

    return parallel_state


def _tp_group() -> ProcessGroup | None:
    mpu = _mpu()
    return mpu.get_tensor_model_parallel_group() if mpu.get_tensor_model_parallel_world_size() > 1 \
        else None


def _valid_vocab(model: torch.nn.Module) -> int:
    core = unwrap_model(model)
    lm = getattr(core, "language_model", core)
    return int(lm.hf_vocab_size)


def _device(model: torch.nn.Module) -> torch.device:
    return next(unwrap_model(model).parameters()).device


def _model_forward(model: torch.nn.Module, t: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """One Qwen2.5-VL stage's forward (images on the first stage, M-RoPE everywhere)."""
    return model(t["input_ids"], position_ids=t["position_ids"],
                 pixel_values=t["pixel_values"], image_grid_thw=t["image_grid_thw"],
                 image_index=t.get("image_index"))


def _token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                    valid_vocab: int, chunk_size: int, biased_ids: Sequence[int] = ()
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(labels.shape):
        raise RuntimeError(f"last stage returned {tuple(logits.shape)}; expected vocab-parallel "
                           f"logits [B, S, V/TP] with [B, S] = {tuple(labels.shape)}")
    return vocab_parallel_logprobs_and_entropy(
        logits, labels, _tp_group(), temperature=temperature, valid_vocab_size=valid_vocab,
        chunk_size=chunk_size, biased_ids=biased_ids)


def _run_schedule(model: torch.nn.Module, mbs: list[MicroBatch],
                  forward_step: ForwardStep[MicroBatch], forward_only: bool) -> None:
    """The micro-batches through :func:`run_schedule` (results stay in the closures)."""
    run_schedule(model, mbs, forward_step, forward_only=forward_only,
                 seq_length=max(mb.tensors["input_ids"].shape[1] for mb in mbs),
                 micro_batch_size=max(len(mb.indices) for mb in mbs))


# ------------------------------------------------------------------------ log-probs


@torch.no_grad()
def compute_logprobs(
    model: torch.nn.Module,
    batch: RolloutBatch,
    micro_batch_size: int,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
    pad_to_multiple_of: int = 8,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    broadcast: bool = True,
) -> TokenLogProbs | None:
    """Per-token log-probs of ``batch``'s responses under ``model``, forward only.

    Args:
        model: this rank's stage (bare or wrapped in Megatron DDP); put in eval mode for
            the call and restored.
        batch: this data-parallel rank's share (its M-RoPE positions are computed once
            and cached on it).
        micro_batch_size: responses per forward.
        temperature: T of ``softmax(logits / T)``.
        with_entropy: also return the per-token entropy.
        broadcast: send the last stage's results to the other pipeline stages (see the
            module docstring); with ``False`` non-last stages return ``None``.

    Returns:
        :class:`TokenLogProbs` with fp32 ``[R_i]`` CPU tensors in ``batch`` order.
    """
    batch.ensure_position_ids(model)
    mbs = batch.micro_batches(micro_batch_size, pad_to_multiple_of)
    device, valid = _device(model), _valid_vocab(model)
    found: dict[int, torch.Tensor] = {}
    found_ent: dict[int, torch.Tensor] = {}

    def forward_step(data_iterator: Iterator[MicroBatch], stage: torch.nn.Module
                     ) -> tuple[torch.Tensor, LossFunc]:
        mb = next(data_iterator).to(device)
        output = _model_forward(stage, mb.tensors)

        def loss_func(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            lp, ent = _token_logprobs(logits, mb.tensors["labels"], temperature, valid,
                                      chunk_size, batch.biased_ids)
            rows = zip(mb.indices, extract_per_token(lp.float().cpu(), mb.prompt_lens,
                                                     mb.response_lens), strict=True)
            found.update(rows)
            if with_entropy:
                found_ent.update(zip(mb.indices, extract_per_token(
                    ent.float().cpu(), mb.prompt_lens, mb.response_lens), strict=True))
            return torch.zeros((), device=logits.device), {}

        return output, loss_func

    was_training = model.training
    model.eval()
    try:
        _run_schedule(model, mbs, forward_step, forward_only=True)
    finally:
        model.train(was_training)
    last = _mpu().is_pipeline_last_stage(ignore_virtual=True)
    if not broadcast or _mpu().get_pipeline_model_parallel_world_size() == 1:
        if not last:
            return None
        return TokenLogProbs([found[i] for i in range(len(batch))],
                             [found_ent[i] for i in range(len(batch))] if with_entropy else None)
    rows = 2 if with_entropy else 1
    lens = batch.response_lens
    flat = torch.zeros(rows, sum(lens), dtype=torch.float32, device=device)
    if last:
        flat[0] = torch.cat([found[i] for i in range(len(batch))]).to(device)
        if with_entropy:
            flat[1] = torch.cat([found_ent[i] for i in range(len(batch))]).to(device)
    flat = from_last_stage(flat).cpu()
    logprobs = list(flat[0].split(lens))
    return TokenLogProbs(logprobs, list(flat[1].split(lens)) if with_entropy else None)


# ------------------------------------------------------------------------ training step


def _global_counts(batch: RolloutBatch) -> tuple[float, float, float]:
    """(response tokens, sequences with one, input tokens) summed over DP ranks."""
    seqs = sum(1 for m in batch.response_mask if bool(m.any()))
    t = torch.tensor([batch.num_response_tokens(), seqs, batch.num_tokens()], dtype=torch.float64)
    tokens, seqs_f, inputs = dp_all_reduce(t).tolist()
    return tokens, seqs_f, inputs


def _micro_batch_stats(loss: torch.Tensor, metrics: dict[str, torch.Tensor], old: torch.Tensor,
                       t: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 sums to reduce over micro-batches and DP, and the ratio maximum."""
    n = metrics["train/response_tokens"].double()
    mask = t["response_mask"] > 0
    if "rollout_logprobs" in t:
        diff = (old.detach().double() - t["rollout_logprobs"].double()).abs()
        masked = torch.where(mask, diff, torch.zeros_like(diff))
        mismatch = torch.stack([masked.sum(), mask.sum().double()])
        worst = masked.max().reshape(1)
    else:
        mismatch = torch.zeros(2, dtype=torch.float64, device=n.device)
        worst = torch.zeros(1, dtype=torch.float64, device=n.device)
    sums = torch.cat([torch.stack([loss.detach().double(), n]),
                      torch.stack([n * metrics[k].double() for k in _MEAN_KEYS]), mismatch])
    return sums.cpu(), torch.cat([metrics["train/ratio_max"].double().reshape(1), worst]).cpu()


def _reduce_metrics(sums: list[torch.Tensor], maxes: list[torch.Tensor]) -> dict[str, float]:
    """Micro-batch sums → global metrics, identical on every rank (DP sum, PP broadcast)."""
    width = 4 + len(_MEAN_KEYS)
    total = torch.stack(sums).sum(0) if sums else torch.zeros(width, dtype=torch.float64)
    top = torch.stack(maxes).amax(0) if maxes else torch.zeros(2, dtype=torch.float64)
    total = from_last_stage(dp_all_reduce(total))
    top = from_last_stage(dp_all_reduce(top, op=dist.ReduceOp.MAX))
    v = total.tolist()
    tokens = v[1]
    out = {"train/loss": v[0], "train/response_tokens": tokens,
           "train/ratio_max": float(top[0])}
    for k, s in zip(_MEAN_KEYS, v[2:2 + len(_MEAN_KEYS)], strict=True):
        out[k] = s / tokens if tokens > 0 else 0.0
    mm_sum, mm_count = v[-2], v[-1]
    out["train/logprob_mismatch"] = mm_sum / mm_count if mm_count > 0 else math.nan
    out["train/logprob_mismatch_max"] = float(top[1]) if mm_count > 0 else math.nan
    return out


def _check_train_inputs(model: DistributedDataParallel, batch: RolloutBatch,
                        loss_cfg: GRPOLossConfig) -> None:
    if not hasattr(model, "zero_grad_buffer"):
        raise TypeError("grpo_train_step needs the model wrapped in Megatron DDP "
                        "(sophiavl_mcore.trainer.optim.wrap_ddp); got "
                        f"{type(model).__name__}")
    if model.config.finalize_model_grads_func is None:
        raise ValueError("model.config.finalize_model_grads_func is not set, so gradients would "
                         "be neither DP-reduced nor TP-averaged; wrap the model with "
                         "sophiavl_mcore.trainer.optim.wrap_ddp")
    if loss_cfg.kl_coef > 0 and batch.ref_logprobs is None:
        raise ValueError(f"loss kl_coef={loss_cfg.kl_coef} > 0 but batch.ref_logprobs is None; "
                         "compute them with ReferenceModel.compute_logprobs or set kl_coef=0")
    cp = _mpu().get_context_parallel_world_size()
    if cp != 1:
        raise NotImplementedError(f"context parallelism (cp={cp}) is not supported by the "
                                  "GRPO step: micro-batches are not split along the sequence")


def grpo_train_step(
    model: DistributedDataParallel,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    batch: RolloutBatch,
    loss_cfg: GRPOLossConfig,
    micro_batch_size: int,
    temperature: float = 1.0,
    *,
    clip_grad: float | None = None,
    pad_to_multiple_of: int = 8,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """One GRPO update of ``model`` on ``batch`` (this DP rank's share of the step).

    Args:
        model: this rank's stage wrapped by :func:`~sophiavl_mcore.trainer.optim.wrap_ddp`.
        optimizer, scheduler: from :func:`~sophiavl_mcore.trainer.optim.build_optimizer`.
        batch: responses with ``advantages`` and, normally, ``old_logprobs`` (from
            :func:`compute_logprobs` before the update) and ``ref_logprobs`` (needed when
            ``loss_cfg.kl_coef > 0``). Without ``old_logprobs`` the current log-probs,
            detached, stand in (exact for the first update on freshly sampled data: ratio 1).
        loss_cfg: PPO-clip / KL / entropy settings and the aggregation.
        micro_batch_size: responses per forward/backward.
        temperature: the rollout's sampling temperature.
        clip_grad: global gradient-norm clip; default ``optimizer.config.clip_grad``.

    Returns:
        Metrics, identical on every rank: ``train/loss`` (global loss before the update),
        ``train/pg_loss``, ``train/kl``, ``train/entropy`` (nats), ``train/clip_fraction``,
        ``train/ratio_mean``, ``train/ratio_max``, ``train/approx_kl_old`` (means over the
        step's response tokens), ``train/response_tokens``, ``train/logprob_mismatch``
        / ``train/logprob_mismatch_max`` (mean / max |old − rollout log-prob| over
        response tokens; NaN without rollout log-probs), ``train/grad_norm`` (before clipping), ``train/lr``,
        ``train/update_ok``, ``train/input_tokens`` (prompt + response tokens of the
        global batch), ``perf/train_tokens_per_s`` (those per second of this call — the
        update phase only) and ``perf/train_time_s``.
    """
    start = time.perf_counter()
    _check_train_inputs(model, batch, loss_cfg)
    mpu = _mpu()
    batch.ensure_position_ids(model)
    mbs = batch.micro_batches(micro_batch_size, pad_to_multiple_of)
    tokens, seqs, inputs = _global_counts(batch)
    if tokens <= 0:
        raise ValueError(f"the global batch has no response token in the loss ({seqs:.0f} "
                         f"sequences, {inputs:.0f} input tokens); nothing to train on")
    scale = len(mbs) * mpu.get_data_parallel_world_size() / mpu.get_context_parallel_world_size()
    device, valid = _device(model), _valid_vocab(model)
    kwargs = loss_cfg.loss_kwargs()
    sums: list[torch.Tensor] = []
    maxes: list[torch.Tensor] = []

    def forward_step(data_iterator: Iterator[MicroBatch], stage: torch.nn.Module
                     ) -> tuple[torch.Tensor, LossFunc]:
        mb = next(data_iterator).to(device)
        t = mb.tensors
        output = _model_forward(stage, t)

        def loss_func(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            lp, ent = _token_logprobs(logits, t["labels"], temperature, valid, chunk_size,
                                      batch.biased_ids)
            old = t["old_logprobs"] if "old_logprobs" in t else lp.detach()
            loss, metrics = grpo_loss(
                lp, old, t.get("ref_logprobs"), t["advantages"], t["response_mask"],
                entropy=ent, global_token_count=tokens, global_seq_count=max(seqs, 1.0),
                **kwargs)
            s, m = _micro_batch_stats(loss, metrics, old, t)
            sums.append(s)
            maxes.append(m)
            return loss * scale, {}

        return output, loss_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    model.train()
    _run_schedule(model, mbs, forward_step, forward_only=False)
    clip = float(optimizer.config.clip_grad) if clip_grad is None else float(clip_grad)
    result = optimizer_step(optimizer, scheduler, clip)
    out = _reduce_metrics(sums, maxes)
    elapsed = time.perf_counter() - start
    out.update({
        "train/grad_norm": result.grad_norm,
        "train/lr": result.lr,
        "train/update_ok": float(result.update_successful),
        "train/input_tokens": inputs,
        "perf/train_tokens_per_s": inputs / elapsed,
        "perf/train_time_s": elapsed,
    })
    return out
