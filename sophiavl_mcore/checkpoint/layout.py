"""Where a process sits in the TP × PP × DP grid, and the few collectives that training
checkpoints and exports need (each a no-op without torch.distributed, so the same code
runs in one process and in a job)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class RankLayout:
    """Where this process sits in the TP × PP × DP grid (all 1/0 without distributed)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0

    def sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "world_size": self.world_size}

    @staticmethod
    def describe(sizes: Mapping[str, int]) -> str:
        return (f"tp={sizes.get('tp')} pp={sizes.get('pp')} dp={sizes.get('dp')} "
                f"(world_size={sizes.get('world_size')})")


def current_layout() -> RankLayout:
    """The layout from Megatron ``parallel_state`` (or plain torch.distributed, or none)."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if dist else 0
    world = torch.distributed.get_world_size() if dist else 1
    # Only a process that imported Megatron can have its parallel state (importing it
    # here would cost seconds for plain-torch users).
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        return RankLayout(
            tp=ps.get_tensor_model_parallel_world_size(),
            pp=ps.get_pipeline_model_parallel_world_size(),
            dp=ps.get_data_parallel_world_size(), rank=rank, world_size=world,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(),
        )
    return RankLayout(dp=world, rank=rank, world_size=world, dp_rank=rank)


# ------------------------------------------------------------------ collectives


def _world() -> int:
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if dist else 1


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if _world() > 1:
        torch.distributed.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if _world() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a picklable object per rank)."""
    if _world() == 1:
        return [obj]
    out: list[Any] = [None] * _world()
    torch.distributed.all_gather_object(out, obj)
    return out
