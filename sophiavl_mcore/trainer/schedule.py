"""Megatron's pipeline schedule, run one way for every trainer pass.

:func:`run_schedule` calls :func:`megatron.core.pipeline_parallel.get_forward_backward_func`
(no pipelining at PP=1, 1F1B at PP>1) over a list of micro-batches. The GRPO log-prob
passes and update (:mod:`~sophiavl_mcore.trainer.grpo.step`) and the SFT step
(:class:`~sophiavl_mcore.trainer.sft.trainer.SFTTrainer`) all go through it.

Micro-batches are right-padded to their own length, so at PP>1 the stages must exchange
each micro-batch's shape before its activations: ``variable_seq_lengths`` is switched on
in the model's config for the duration of the call and restored afterwards (a config that
already has it on keeps it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeAlias, TypeVar

import torch

from sophiavl_mcore.models.unwrap import unwrap_model

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel

__all__ = ["ForwardStep", "LossFunc", "run_schedule", "variable_seq_lengths"]

MB = TypeVar("MB")  # a micro-batch, as the caller builds it

#: What a forward step hands the schedule with the stage's output: on the last stage it
#: is called on that output and returns (the loss for the backward, a dict the schedule
#: collects per micro-batch).
LossFunc: TypeAlias = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]

#: Megatron's ``forward_step_func(data_iterator, model) -> (output, loss_func)``; the
#: iterator yields the micro-batches given to :func:`run_schedule`.
ForwardStep: TypeAlias = Callable[[Iterator[MB], torch.nn.Module], tuple[torch.Tensor, LossFunc]]


@contextlib.contextmanager
def variable_seq_lengths(model: torch.nn.Module) -> Iterator[None]:
    """PP>1: let the stages exchange each micro-batch's shape (restored afterwards)."""
    from megatron.core import parallel_state

    config = unwrap_model(model).config
    before = config.variable_seq_lengths
    config.variable_seq_lengths = before or parallel_state.get_pipeline_model_parallel_world_size() > 1
    try:
        yield
    finally:
        config.variable_seq_lengths = before


def run_schedule(model: DistributedDataParallel | torch.nn.Module, micro_batches: Sequence[MB],
                 forward_step: ForwardStep[MB], *, forward_only: bool, seq_length: int,
                 micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Forward (and, unless ``forward_only``, backward) of ``micro_batches`` on this rank's
    stage.

    Args:
        model: this rank's stage, bare or wrapped in Megatron DDP (a training pass needs
            DDP: the schedule's ``finalize_model_grads`` reduces its gradient buffers).
        micro_batches: handed to ``forward_step`` one by one through its data iterator.
        forward_step: see :data:`ForwardStep`.
        forward_only: no backward (log-prob passes, evaluation).
        seq_length, micro_batch_size: the longest micro-batch's sequence length and rows
            (the schedule's p2p buffer sizes at PP>1).

    Returns:
        On the last pipeline stage, the dict each micro-batch's ``loss_func`` returned, in
        order; elsewhere an empty list.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    with variable_seq_lengths(model):
        store = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
    return list(store) if store else []
