"""Parallel layout validation (no torch.distributed needed).

A layout is TP × PP × DP = world size. Everything here is pure arithmetic so that it can
run before any process group or tensor exists (``tools/plan``, the 72B meta proof, and
``initialize_parallel`` itself, which validates before touching the network).
"""

from __future__ import annotations

from collections.abc import Sequence

from sophiavl_mcore.parallel.config import LayoutError, ParallelConfig


def stage_layer_counts(
    num_layers: int, pp: int, layers_per_stage: Sequence[int] | None = None
) -> list[int]:
    """Decoder layers held by each pipeline stage, length ``pp``; validates the split."""
    if layers_per_stage is None:
        if num_layers % pp != 0:
            raise LayoutError(
                f"num_layers={num_layers} is not divisible by pp={pp} "
                f"(remainder {num_layers % pp}); give parallel.layers_per_stage explicitly"
            )
        return [num_layers // pp] * pp
    counts = [int(c) for c in layers_per_stage]
    if len(counts) != pp:
        raise LayoutError(f"layers_per_stage={counts} has {len(counts)} entries, pp={pp}")
    if any(c < 1 for c in counts):
        raise LayoutError(f"layers_per_stage={counts}: every stage needs >= 1 layer")
    if sum(counts) != num_layers:
        raise LayoutError(
            f"layers_per_stage={counts} sums to {sum(counts)}, the model has num_layers={num_layers}"
        )
    return counts


def stage_layer_offsets(counts: Sequence[int]) -> list[int]:
    """Global index of each stage's first decoder layer."""
    offsets, acc = [], 0
    for c in counts:
        offsets.append(acc)
        acc += c
    return offsets


def validate_layout(
    parallel_cfg: ParallelConfig,
    world_size: int,
    num_layers: int,
    num_heads: int,
    num_query_groups: int,
) -> int:
    """Check a layout against the world size and the model; returns the data-parallel size.

    Raises:
        LayoutError: naming every number (world size, tp, pp, dp, heads, groups, layers).
    """
    tp, pp = parallel_cfg.tp, parallel_cfg.pp
    problems = []
    if world_size % (tp * pp) != 0:
        problems.append(
            f"world_size={world_size} is not divisible by tp*pp={tp}*{pp}={tp * pp}"
        )
        dp = None
    else:
        dp = world_size // (tp * pp)
        if parallel_cfg.dp is not None and parallel_cfg.dp != dp:
            problems.append(
                f"dp={parallel_cfg.dp} but world_size={world_size} / (tp={tp} * pp={pp}) = {dp}"
            )
    if num_heads % tp != 0:
        problems.append(f"num_attention_heads={num_heads} is not divisible by tp={tp}")
    if num_query_groups % tp != 0:
        problems.append(
            f"num_query_groups (num_key_value_heads)={num_query_groups} is not divisible by tp={tp}"
        )
    if num_heads % num_query_groups != 0:
        problems.append(
            f"num_attention_heads={num_heads} is not a multiple of num_query_groups={num_query_groups}"
        )
    try:
        stage_layer_counts(num_layers, pp, parallel_cfg.layers_per_stage)
    except LayoutError as err:
        problems.append(str(err))
    if problems:
        raise LayoutError(
            f"impossible parallel layout (world_size={world_size}, tp={tp}, pp={pp}, "
            f"dp={parallel_cfg.dp}, layers={num_layers}, heads={num_heads}, "
            f"query_groups={num_query_groups}): " + "; ".join(problems)
        )
    assert dp is not None
    return dp
