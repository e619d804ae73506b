"""Megatron (TP × PP × DP) → one SPMD vLLM engine shard on *every* rank.

Topology: every trainer rank holds one rank of a rollout engine
(:mod:`~sophiavl_mcore.rollout.layout`); every engine must end up with the same policy
version. For each bucket of the schedule (:mod:`~sophiavl_mcore.weight_sync.schedule`),
each TP-split piece (one Megatron tensor of one (PP stage, TP rank)) is broadcast inside
the receiver's own *model-parallel group* (the TP × PP ranks of its data-parallel
replica) from the replica member that owns it; a TP-replicated tensor (norms, biases of
row-parallel layers, a replicated vision tower) travels only along the pipeline group,
from the same TP rank of its stage. So a rank receives exactly what its replica holds
elsewhere — (TP−1)/TP of the TP-split tensors of its stage plus the other stages'
tensors — and never anything from another replica:

    trainer TP=2, PP=1 (RTP=2):   ≈ model_bytes / 2 per rank
    trainer TP=1, DP=4:           0 bytes (every rank already holds the whole model)
    trainer TP=2, PP=2:           ≈ 3/4 · model_bytes (the other stage's layers)

Each rank then merges full HF tensors (``ConversionPlan.merge``) and writes them into
its own engine through vLLM's loaders, which keep the slice of their rollout-TP rank
(:class:`~sophiavl_mcore.weight_sync.vllm_inplace.InplaceUpdater`). A rank whose engine
TP rank would need less than the full tensor still receives it whole: the loaders
take full tensors; sending each engine rank only its slice is left for later.

Validation runs on every rank against its own engine before anything moves (same
inputs everywhere → same verdict); a failure inside any engine is agreed on with one
all-reduce and raised on every rank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from sophiavl_mcore.parallel.collectives import host_all_reduce
from sophiavl_mcore.weight_sync.interface import SyncReport, WeightSyncError
from sophiavl_mcore.weight_sync.megatron_sync import (
    MegatronWeightSync,
    _local_tensors,
    engine_specs,
    hf_bytes_of_plan,
)
from sophiavl_mcore.weight_sync.memory import PeakRSS
from sophiavl_mcore.weight_sync.schedule import Bucket, RankCoord, source_table

logger = logging.getLogger(__name__)


class SpmdWeightSync(MegatronWeightSync):
    """:class:`~sophiavl_mcore.weight_sync.interface.WeightSync` into the engine shard
    every rank holds. Collective construction (every rank, after
    ``initialize_parallel`` and after its engine exists)."""

    def __init__(self, model: Any, hf_config: Any, engine: Any, cfg: Any = None, *,
                 plan: Any = None, expected_specs: Mapping[str, tuple[int, ...]] | None = None) -> None:
        from megatron.core import parallel_state as ps

        from sophiavl_mcore.weight_sync.config import WeightSyncConfig

        if engine is None:
            raise ValueError(f"rank {dist.get_rank()}: the SPMD weight sync needs this rank's engine")
        self.cfg = cfg or WeightSyncConfig()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_engine_rank = True
        self.engine = engine
        self._bind(model, hf_config)
        self.mp_group = ps.get_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.device = next(self.module.parameters()).device
        self.expected = dict(expected_specs) if expected_specs is not None else engine_specs(engine)
        self._updater = self._make_updater()
        coords, metas = self._gather_meta()
        self.coords = coords
        self.sources = source_table(coords, self.tp, self.pp)
        self.plan = plan if plan is not None else self._build_plan(coords, metas)
        self._version = int(getattr(engine, "policy_version", 0))
        self.engine_update = "reload" if self._updater is None else (
            "live" if self._updater.live else "inplace")
        # (pp, tp, dp) → global rank: a piece's owner inside this rank's replica
        self._owner = {(c.pp_rank, c.tp_rank, c.dp_rank): c.rank for c in coords}
        self.bytes_model = hf_bytes_of_plan(self.plan, next(iter(_local_tensors(self.module).values())).dtype)

    # The base class agrees through the engine rank; here every rank decides the same.
    def _check(self, coords: list[RankCoord], metas: list[dict]) -> None:
        problems = self._trainer_problems(coords, metas) + self._engine_problems()
        if problems:
            raise WeightSyncError(
                f"weight sync refused before loading anything; the engines stay at policy_version="
                f"{self._version}: " + "; ".join(problems))

    def _owner_of(self, src: int, replicated: bool) -> int:
        """Who in this rank's replica holds the pieces the schedule files under ``src``
        (the replica-0 owner of a (stage, TP rank)); a TP-replicated tensor is held by
        every TP rank of its stage, so this rank's own TP rank there serves it."""
        c = self.coords[src]
        tp_rank = self.coord.tp_rank if replicated else c.tp_rank
        return self._owner[(c.pp_rank, tp_rank, self.coord.dp_rank)]

    def _collect(self, bucket: Bucket, tensors: Mapping[str, torch.Tensor]) -> dict:
        """Every piece of ``bucket`` on this rank. TP-split pieces are broadcast inside the
        replica's model-parallel group; TP-replicated ones only along this rank's
        pipeline group (from the same TP rank of the owning stage), so no rank receives
        a tensor it already holds."""
        parts = {}
        for src, dtype in bucket.senders():
            for replicated in (False, True):
                pieces = [p for p in bucket.pieces_from(src, dtype)
                          if (p.rule.kind == "replicated") == replicated]
                if not pieces:
                    continue
                owner = self._owner_of(src, replicated)
                group, size = ((self.pp_group, self.pp) if replicated
                               else (self.mp_group, self.tp * self.pp))
                if owner == self.rank:
                    flat = torch.cat([tensors[p.rule.mcore].detach().reshape(-1) for p in pieces])
                else:
                    flat = torch.empty(sum(torch.Size(p.shape).numel() for p in pieces), dtype=dtype,
                                       device=self.device)
                if size > 1:
                    dist.broadcast(flat, src=owner, group=group)
                    nbytes = flat.numel() * flat.element_size()
                    if owner == self.rank:
                        self._sent += nbytes
                    else:
                        self._received += nbytes
                offset = 0
                for p in pieces:
                    n = torch.Size(p.shape).numel()
                    parts[(p.rule.stage, p.rule.mcore, p.tp_rank)] = flat[offset:offset + n].view(p.shape)
                    offset += n
        return parts

    def _load(self, stream: Iterator[tuple[str, torch.Tensor]], buckets: list[Bucket],
              version: int | None) -> int:
        if self._updater is not None:
            names = [n for b in buckets for r in b.rules for n in r.hf]
            return int(self._updater.load(stream, names, version))
        with torch.no_grad():
            return int(self.engine.load_weights(stream, version))

    def sync(self, version: int | None = None) -> SyncReport:
        """Collective: every rank's engine shard takes this step's weights."""
        start = time.perf_counter()
        self._received = self._sent = 0
        with PeakRSS() as mem:
            coords, metas = self._gather_meta()
            self._check(coords, metas)
            buckets = self._schedule(metas)
            tensors = _local_tensors(self.module)
            progress = {"received": 0, "tensors": 0, "bytes": 0, "buckets": 0}
            error = ""
            try:
                new = self._load(self._hf_stream(buckets, tensors, progress), buckets, version)
            except Exception as err:  # agreed on below, re-raised everywhere
                logger.exception("engine load failed on rank %d", self.rank)
                self._drain(buckets, tensors, progress)
                error, new = f"rank {self.rank}: {type(err).__name__}: {err}", -1
            verdict = torch.tensor([1 if error else 0, new, -new], dtype=torch.int64)
            host_all_reduce(verdict, op=dist.ReduceOp.MAX)
        if verdict[0]:
            raise WeightSyncError(f"weight sync failed inside an engine{': ' + error if error else ''}")
        if int(verdict[1]) != -int(verdict[2]):
            raise WeightSyncError(f"engines disagree on the policy version after the sync: "
                                  f"{-int(verdict[2])}..{int(verdict[1])}")
        self._version = new
        report = SyncReport(
            policy_version=new, num_tensors=progress["tensors"], num_buckets=len(buckets),
            bytes_loaded=progress["bytes"], bytes_sent=self._sent, seconds=time.perf_counter() - start,
            peak_rss_delta_bytes=mem.delta, engine_update=self.engine_update,
            bytes_received=self._received,
        )
        logger.debug("weight sync v%d on rank %d: received %.1f MB of %.1f MB in %.3f s", new,
                     self.rank, self._received / 1e6, self.bytes_model / 1e6, report.seconds)
        return report

    def compare(self, buckets: list[Bucket] | None = None) -> float:
        raise NotImplementedError("the SPMD sync is checked through engine vs Megatron log-probs "
                                  "(train/logprob_mismatch_max), not by reading weights back")
