"""Parallel layout configuration and validation (no torch.distributed needed).

A layout is TP × PP × DP = world size. Everything here is pure arithmetic so that it can
run before any process group or tensor exists (``tools/plan``, the 72B meta proof, and
``initialize_parallel`` itself, which validates before touching the network).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal


class LayoutError(ValueError):
    """An impossible parallel layout; the message carries every number involved."""


@dataclasses.dataclass
class ParallelConfig:
    """Model-parallel layout. The one source of defaults for the ``parallel`` section.

    Attributes:
        tp: tensor-parallel size (heads, query groups and FFN are split ``tp`` ways).
        pp: pipeline-parallel size (decoder layers split across ``pp`` stages).
        dp: data-parallel size; ``None`` derives it as world_size / (tp * pp), an
            integer given here must match that exactly.
        sequence_parallel: Megatron sequence parallelism (GPU only; needs tp > 1).
        backend: ``auto`` picks NCCL when CUDA is available, otherwise gloo.
        layers_per_stage: explicit decoder-layer count per pipeline stage (length pp,
            sum = num_layers); ``None`` splits evenly (num_layers % pp must be 0).
        seed: base seed for the model-parallel RNG streams.
        timeout_minutes: collective timeout.
    """

    tp: int = 1
    pp: int = 1
    dp: int | None = None
    sequence_parallel: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    layers_per_stage: list[int] | None = None
    seed: int = 1234
    timeout_minutes: int = 30

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"parallel.{name} must be an integer >= 1, got {value!r}")
        if self.dp is not None and self.dp < 1:
            raise LayoutError(f"parallel.dp must be >= 1 or null (derived), got {self.dp}")
        if self.sequence_parallel and self.tp == 1:
            raise LayoutError("parallel.sequence_parallel=true needs tp > 1, got tp=1")
        if self.layers_per_stage is not None and len(self.layers_per_stage) != self.pp:
            raise LayoutError(
                f"parallel.layers_per_stage has {len(self.layers_per_stage)} entries "
                f"{list(self.layers_per_stage)} but pp={self.pp}"
            )


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
