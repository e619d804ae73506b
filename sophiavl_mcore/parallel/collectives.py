"""The collectives the trainers use, written once.

Three kinds of data move between ranks in a step:

- **Megatron groups** (data-parallel, pipeline): sums of loss statistics over the DP
  replicas (:func:`dp_all_reduce`, :func:`dp_sum`) and values only the last pipeline
  stage knows (:func:`from_last_stage`, :func:`from_last_stage_floats`). These groups
  share the default backend, so a tensor travels on the collective device (the current
  GPU under NCCL, the CPU under gloo) and comes back on the device it came from.
- **Host tensors over the world** (responses, scalars, counts): through the gloo group
  of :mod:`~sophiavl_mcore.parallel.host` (:func:`host_all_gather`,
  :func:`host_all_reduce`, :func:`host_all_gather_object`).
- **One rank works, the others learn the outcome** (:func:`run_on_rank`): the result,
  or the failure, of a callable run on one rank reaches every rank, so a failure there
  is an error everywhere instead of a hang in the next collective.

Every function is a collective over its group: every rank of the group calls it. With
one rank in the group nothing is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from sophiavl_mcore.parallel.host import host_group

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "RemoteError",
    "dp_all_reduce",
    "dp_sum",
    "from_last_stage",
    "from_last_stage_floats",
    "host_all_gather",
    "host_all_gather_object",
    "host_all_reduce",
    "run_on_rank",
]

T = TypeVar("T")


class RemoteError(RuntimeError):
    """The callable of :func:`run_on_rank` failed on the rank that ran it."""


def _collective_device() -> torch.device:
    """Where the default backend moves tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType, group: ProcessGroup | None
                ) -> torch.Tensor:
    """``t`` all-reduced over ``group`` on the collective device, back on ``t``'s device."""
    moved = t.to(_collective_device())
    dist.all_reduce(moved, op=op, group=group)
    return moved.to(t.device)


# ------------------------------------------------------------------ Megatron groups


def dp_all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
                  ) -> torch.Tensor:
    """``t`` reduced over the data-parallel group (``t`` itself when DP = 1)."""
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_world_size() == 1:
        return t
    return _all_reduce(t, op, parallel_state.get_data_parallel_group())


def dp_sum(values: Sequence[float]) -> list[float]:
    """Element-wise fp64 sums of ``values`` over the data-parallel ranks."""
    return dp_all_reduce(torch.tensor(list(values), dtype=torch.float64)).tolist()


def from_last_stage(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the last pipeline stage holds it, on every stage (``t`` when PP = 1).

    Every stage passes a tensor of the same shape and dtype; the others' contents are
    overwritten.
    """
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return t
    moved = t.to(_collective_device())
    dist.broadcast(moved, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return moved.to(t.device)


def from_last_stage_floats(values: Sequence[float]) -> list[float]:
    """fp64 ``values`` known on the last pipeline stage, made known on every stage."""
    return from_last_stage(torch.tensor(list(values), dtype=torch.float64)).tolist()


# ------------------------------------------------------------------ host tensors, world


def host_all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's host tensor ``t`` (same shape and dtype everywhere), by global rank."""
    group = host_group()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return out


def host_all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
                    ) -> torch.Tensor:
    """Host tensor ``t`` reduced over the world, in place; returns ``t``."""
    dist.all_reduce(t, op=op, group=host_group())
    return t


def host_all_gather_object(obj: T) -> list[T]:
    """Every rank's picklable ``obj``, by global rank."""
    group = host_group()
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


# ------------------------------------------------------------------ one rank works


def run_on_rank(fn: Callable[[], T], *, src: int = 0, group: ProcessGroup | None = None) -> T:
    """``fn()`` on global rank ``src`` only; its result on every rank of ``group``.

    ``group`` defaults to the host group (the whole world). The result must pickle. When
    ``fn`` raises an :class:`Exception`, ``src`` re-raises it after telling the others,
    which raise :class:`RemoteError` with its type and message — nobody is left waiting in
    a later collective for a rank that has given up. Without a process group (or with one
    rank) it is just ``fn()``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    group = group if group is not None else host_group()
    if dist.get_world_size(group) == 1:
        return fn()
    box: list[Any] = [None]
    failure: Exception | None = None
    if dist.get_rank() == src:
        try:
            box[0] = ("ok", fn())
        except Exception as err:
            failure = err
            box[0] = ("error", f"{type(err).__name__}: {err}")
    dist.broadcast_object_list(box, src=src, group=group)
    if failure is not None:
        raise failure
    kind, value = box[0]
    if kind != "ok":
        raise RemoteError(f"rank {src} failed: {value}")
    return value
