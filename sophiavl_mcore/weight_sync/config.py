"""Typed configuration of the weight sync (the single source of its defaults)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal


@dataclasses.dataclass
class WeightSyncConfig:
    """How trainer weights reach the rollout engines (every rank holds an engine shard;
    ``engine_rank`` is gone, see ``REMOVED_KEYS``).

    Attributes:
        bucket_bytes: upper bound (bytes) on the weights gathered and in flight at once;
            a single tensor larger than this travels alone in its own bucket.
        require_complete: every tensor the engine expects must be sent; ``False``
            allows partial syncs (e.g. a frozen vision tower that never changes).
        debug_compare: after each sync, read the weights back from the engine and
            compare them with the trainer's (costs a second gather; for debugging).
        debug_atol: largest allowed |engine - trainer| after casting the trainer's
            tensor to the engine's dtype (0 = bit-exact).
        engine_update: how the engine takes the tensors. ``inplace``: copied straight
            into the engine's parameters through vLLM's own loader (name mapping,
            q/k/v and gate/up packing, rollout-TP slicing); on CPU each written layer
            whose GEMM keeps a packed copy is re-packed once per sync with vLLM's own
            post-processing (:mod:`~sophiavl_mcore.weight_sync.vllm_repack`).
            ``live``: like ``inplace``, but on CPU written layers switch to the GEMM on
            the plain weight (no re-pack: fastest sync, slower CPU generation; same as
            ``inplace`` on GPU). ``reload``: vLLM's ``reload_weights`` (layer-wise
            meta restore + post-processing; ~10x slower on CPU). ``auto``:
            ``inplace`` where the engine supports it, else ``reload``.
    """

    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "engine_rank": "every rank holds an engine shard (SPMD rollout), so there is no engine rank to pick",
    }

    bucket_bytes: int = 512 * 2**20
    require_complete: bool = True
    debug_compare: bool = False
    debug_atol: float = 0.0
    engine_update: Literal["auto", "inplace", "live", "reload"] = "auto"

    def __post_init__(self) -> None:
        errors = []
        if self.bucket_bytes < 2**20:
            errors.append(f"bucket_bytes={self.bucket_bytes} must be >= 1 MiB (1048576)")
        if self.debug_atol < 0:
            errors.append(f"debug_atol={self.debug_atol} must be >= 0")
        if self.engine_update not in ("auto", "inplace", "live", "reload"):
            errors.append(f"engine_update={self.engine_update!r} must be auto, inplace, live or reload")
        if errors:
            raise ValueError("weight_sync: " + "; ".join(errors))
