"""The ``parallel`` config section and the error a layout that cannot work raises.

Pure arithmetic, no torch.distributed: :mod:`.layout` validates a layout against a world
and a model, :mod:`.init` builds the process groups from it.
"""

from __future__ import annotations

import dataclasses
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
