"""Parallel layout: validation, torch.distributed + Megatron parallel_state init, CPU mode.

Public API::

    ParallelConfig, LayoutError, validate_layout, stage_layer_counts
    initialize_parallel(cfg, *, num_layers=, num_heads=, num_query_groups=) -> ParallelInfo
    destroy_parallel()
    cpu_compat.apply() / cpu_compat.remove()
"""

from sophiavl_mcore.parallel.config import LayoutError, ParallelConfig
from sophiavl_mcore.parallel.init import ParallelInfo, destroy_parallel, initialize_parallel
from sophiavl_mcore.parallel.layout import (
    stage_layer_counts,
    stage_layer_offsets,
    validate_layout,
)

__all__ = [
    "LayoutError",
    "ParallelConfig",
    "ParallelInfo",
    "destroy_parallel",
    "initialize_parallel",
    "stage_layer_counts",
    "stage_layer_offsets",
    "validate_layout",
]
