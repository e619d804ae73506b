"""A gloo view of the world for collectives on host (CPU) tensors.

The trainer's default group is NCCL on GPU, which only moves CUDA tensors; the step's
bookkeeping (response exchange, metric gathers, TRM scores) lives in host memory. On CPU
the default group is gloo already and :func:`host_group` returns None (= default).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

_HOST_GROUP: Any = None


def init_host_group() -> None:
    """Collective (every rank, once, after the default group exists)."""
    global _HOST_GROUP
    if _HOST_GROUP is None and dist.get_backend() != "gloo":
        _HOST_GROUP = dist.new_group(backend="gloo")


def host_group() -> Any:
    """The gloo world group for host tensors (None: the default group is gloo)."""
    return _HOST_GROUP
