"""Parallel layout: validation, torch.distributed + Megatron parallel_state init, CPU mode.

Public API::

    ParallelConfig, LayoutError, validate_layout, stage_layer_counts
    initialize_parallel(cfg, *, num_layers=, num_heads=, num_query_groups=) -> ParallelInfo
    destroy_parallel()
    cpu_compat.apply() / cpu_compat.remove()
"""

from sophiavl_mcore.lazy import lazy_attributes

# Imported on first use, so that importing the package (e.g. for one of its
# torch-free submodules) does not import torch: tools/plan.py needs only the layout arithmetic.
_EXPORTS = {
    "LayoutError": "sophiavl_mcore.parallel.config",
    "ParallelConfig": "sophiavl_mcore.parallel.config",
    "ParallelInfo": "sophiavl_mcore.parallel.init",
    "destroy_parallel": "sophiavl_mcore.parallel.init",
    "initialize_parallel": "sophiavl_mcore.parallel.init",
    "stage_layer_counts": "sophiavl_mcore.parallel.layout",
    "stage_layer_offsets": "sophiavl_mcore.parallel.layout",
    "validate_layout": "sophiavl_mcore.parallel.layout",
}
__getattr__ = lazy_attributes(__name__, _EXPORTS)

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
