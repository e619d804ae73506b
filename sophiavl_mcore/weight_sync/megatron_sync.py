"""Megatron (TP shards × PP stages) → the rollout engine(s), in size-bounded buckets.

One class, :class:`MegatronWeightSync`, parameterised by ``engine_ranks`` — the global
ranks whose process holds an engine (or an engine shard):

- every rank (``engine_ranks=None``, the training case): each rank holds one rank of an
  SPMD rollout engine (:mod:`~sophiavl_mcore.rollout.layout`) and receives, per bucket,
  the pieces its data-parallel replica holds elsewhere
  (:class:`~sophiavl_mcore.weight_sync.transport.ReplicaBroadcast`);
- one rank (``engine_ranks=[r]``): one colocated engine; the replica-0 owners send it
  their pieces point to point
  (:class:`~sophiavl_mcore.weight_sync.transport.PointToPoint`).

For each bucket (:mod:`~sophiavl_mcore.weight_sync.schedule`) an engine rank merges the
TP pieces of each rule into full HF tensors (``ConversionPlan.merge``: q/k/v
de-interleave, gate/up split, vocab padding dropped) under *global* layer indices and
yields them, lazily, into one engine write per sync. Because the engine receives full HF
tensors and shards them itself (vLLM's loaders keep their rollout-TP slice), the
trainer's TP/PP and the rollout's TP are independent.

Engine write (``cfg.engine_update``): ``inplace`` (default where supported) copies each
tensor straight into the engine's parameters through the model's own ``load_weights``
(:mod:`~sophiavl_mcore.weight_sync.vllm_inplace`; on CPU, packed GEMM layers are
re-packed once each, :mod:`~sophiavl_mcore.weight_sync.vllm_repack`); ``live`` (CPU
opt-in) switches written layers to a GEMM on the plain weight instead; ``reload`` uses
vLLM's ``reload_weights``. Each is one call per sync, never per bucket.

Memory: a sender holds one packed buffer of its share of one bucket; an engine rank one
bucket of received pieces plus the merged tensors of the rule being loaded. Peak RSS is
measured and returned in the :class:`SyncReport`.

Failure: names, shapes and the rank layout are validated on every engine rank against
its engine's expected tensors *before* anything is sent; the verdict is agreed over the
world, so a bad name or shape raises the same :class:`WeightSyncError` on every rank
with every engine untouched (previous weights, previous ``policy_version``). A failure
inside an engine after validation (not expected) still drains every pending message so
that no rank hangs, and is re-raised on every rank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from sophiavl_mcore.checkpoint.mapping import ConversionPlan
from sophiavl_mcore.models.hf_config import load_config_json
from sophiavl_mcore.models.unwrap import checkpoint_view
from sophiavl_mcore.parallel.collectives import host_all_gather_object
from sophiavl_mcore.weight_sync.config import WeightSyncConfig
from sophiavl_mcore.weight_sync.interface import SyncReport, WeightSync, WeightSyncError
from sophiavl_mcore.weight_sync.memory import PeakRSS
from sophiavl_mcore.weight_sync.plan_checks import (
    engine_prefix,
    engine_problems,
    hf_bytes_of_plan,
    sync_plan,
    trainer_problems,
)
from sophiavl_mcore.weight_sync.schedule import Bucket, RankCoord, build_buckets, source_table
from sophiavl_mcore.weight_sync.transport import PointToPoint, ReplicaBroadcast, local_tensors

logger = logging.getLogger(__name__)

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
T = TypeVar("T")


def _one_chunk(model: torch.nn.Module | Sequence[torch.nn.Module]) -> torch.nn.Module:
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise NotImplementedError(
                f"weight sync got {len(model)} model chunks; virtual pipeline stages are not supported"
            )
        model = model[0]
    return model


def _merge(plan: ConversionPlan, rule: Any, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """Full HF tensors of ``rule``; with one piece, views instead of copies where the
    layouts agree (everything but the q/k/v regrouping)."""
    if len(pieces) == 1:
        only = pieces[0]
        if rule.kind in ("replicated", "column", "row"):
            return [only]
        if rule.kind == "vocab":
            return [only[: rule.hf_shapes[0][0]]]
        if rule.kind == "gate_up":
            return list(only.chunk(2, dim=0))
    return plan.merge(rule, pieces)


def _check_engine_ranks(engine_ranks: Sequence[int] | None, world: int) -> tuple[int, ...]:
    if engine_ranks is None:
        return tuple(range(world))
    ranks = tuple(sorted(set(int(r) for r in engine_ranks)))
    if len(ranks) != len(engine_ranks) or not ranks or ranks[0] < 0 or ranks[-1] >= world:
        raise ValueError(f"engine_ranks={list(engine_ranks)}: distinct ranks of a world of {world}")
    if len(ranks) not in (1, world):
        raise ValueError(f"engine_ranks={list(engine_ranks)}: engines on every rank or on one "
                         f"rank are supported, not on {len(ranks)} of {world}")
    return ranks


class MegatronWeightSync(WeightSync):
    """:class:`WeightSync` from a live Megatron model (any TP × PP × DP) into the
    engine(s) held by ``engine_ranks``.

    Args:
        model: this rank's model (GPTModel, Qwen25VLModel, or a one-chunk list; DDP /
            Float16Module wrappers are unwrapped).
        hf_config: the policy's HF ``config.json`` (path, dir or dict).
        engine: this rank's :class:`~sophiavl_mcore.rollout.RolloutEngine` (or engine
            shard) on an engine rank; ``None`` on every other rank.
        cfg: bucket size, engine update, completeness, debug compare.
        engine_ranks: global ranks holding an engine: ``None`` = every rank (SPMD
            rollout, what training builds), or exactly one rank.
        plan: override the conversion plan (tests; e.g. to rename a tensor).
        expected_specs: ``{HF name: full shape}`` the engine accepts; default: read
            from the engine's checkpoint (engine ranks only).

    Construction is collective (every trainer rank, after ``initialize_parallel`` and
    after the engines exist); a misplaced engine is a ``ValueError`` on every rank.
    """

    def __init__(
        self,
        model: Any,
        hf_config: Mapping[str, Any] | str | Path,
        engine: Any = None,
        cfg: WeightSyncConfig | None = None,
        *,
        engine_ranks: Sequence[int] | None = None,
        plan: ConversionPlan | None = None,
        expected_specs: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        from megatron.core import parallel_state as ps

        self.cfg = cfg or WeightSyncConfig()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.engine_ranks = _check_engine_ranks(engine_ranks, self.world)
        self.every_rank = len(self.engine_ranks) == self.world
        self.is_engine_rank = self.rank in self.engine_ranks
        self.engine = engine
        self.module = checkpoint_view(_one_chunk(model))
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.coord = RankCoord(self.rank, ps.get_tensor_model_parallel_rank(),
                               ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank())
        self.hf_config = load_config_json(hf_config)
        self.device = next(self.module.parameters()).device
        self.expected: dict[str, tuple[int, ...]] | None = None
        self._updater: Any = None
        state = self._agreed(lambda: self._engine_state(expected_specs), "weight sync set-up", ValueError)
        first = state[self.engine_ranks[0]]
        if any(s != first for s in (state[r] for r in self.engine_ranks)):
            raise ValueError(f"engines disagree at set-up (policy_version, engine_update, prefix): "
                             f"{[state[r] for r in self.engine_ranks]}")
        self._version, self.engine_update, prefix = first  # engine_update: every rank
        coords, metas = self._gather_meta()
        self.coords = coords
        self.sources = source_table(coords, self.tp, self.pp)
        self.plan = plan if plan is not None else sync_plan(self.hf_config, self.tp, self.pp,
                                                            coords, metas, prefix)
        self.transport: PointToPoint | ReplicaBroadcast = (
            ReplicaBroadcast(self.coord, coords, self.tp, self.pp, ps.get_model_parallel_group(),
                             ps.get_pipeline_model_parallel_group(), self.device)
            if self.every_rank else PointToPoint(self.rank, self.engine_ranks[0], self.device))
        dtype = next(iter(local_tensors(self.module).values())).dtype
        self.bytes_model = hf_bytes_of_plan(self.plan, dtype)  # HF bytes of one full sync

    # ------------------------------------------------------------------ setup

    def _engine_state(self, expected_specs: Mapping[str, tuple[int, ...]] | None
                      ) -> tuple[int, str, str] | None:
        """On an engine rank: (policy_version, engine_update kind, HF prefix), after
        reading the expected tensors and making the updater; None elsewhere."""
        if not self.is_engine_rank:
            if self.engine is not None:
                raise ValueError(f"rank {self.rank} got an engine but engine_ranks="
                                 f"{list(self.engine_ranks)}")
            return None
        if self.engine is None:
            raise ValueError(f"rank {self.rank} holds an engine (engine_ranks="
                             f"{list(self.engine_ranks)}) but got none")
        self.expected = dict(expected_specs) if expected_specs is not None else engine_specs(self.engine)
        if self.expected is None:
            logger.warning("engine exposes no expected tensors; names/shapes are not pre-checked")
        self._updater = self._make_updater()
        kind = "reload" if self._updater is None else ("live" if self._updater.live else "inplace")
        return int(getattr(self.engine, "policy_version", 0)), kind, engine_prefix(self.expected)

    def _make_updater(self) -> Any:
        """The in-place writer for ``cfg.engine_update`` (None: vLLM's reload)."""
        if self.cfg.engine_update == "reload":
            return None
        from sophiavl_mcore.weight_sync.vllm_inplace import InplaceUpdater

        reason = InplaceUpdater.unsupported_reason(self.engine)
        if reason is None:
            return InplaceUpdater(self.engine, live=self.cfg.engine_update == "live")
        if self.cfg.engine_update != "auto":
            raise ValueError(f"weight_sync.engine_update={self.cfg.engine_update} but the engine "
                             f"cannot be updated in place: {reason}")
        logger.info("weight sync falls back to the engine's reload: %s", reason)
        return None

    def _agreed(self, fn: Callable[[], T], what: str, error: type[Exception]) -> list[T]:
        """``fn()`` on every rank; every rank's result by global rank. If it raised
        anywhere, ``error`` naming the first failing rank is raised on every rank."""
        try:
            mine: tuple[str, Any] = ("ok", fn())
        except Exception as err:  # agreed on below
            logger.exception("%s failed on rank %d", what, self.rank)
            mine = ("error", f"rank {self.rank}: {type(err).__name__}: {err}")
        everyone = host_all_gather_object(mine)
        failed = [v for k, v in everyone if k == "error"]
        if failed:
            raise error(f"{what} failed: {failed[0]}")
        return [v for _, v in everyone]

    def _gather_meta(self) -> tuple[list[RankCoord], list[dict[str, tuple[str, tuple[int, ...]]]]]:
        meta = {k: (str(v.dtype), tuple(v.shape)) for k, v in local_tensors(self.module).items()}
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, (self.coord, meta))
        return [o[0] for o in out], [o[1] for o in out]

    # ------------------------------------------------------------------ validation

    def _check(self, coords: list[RankCoord], metas: list[dict]) -> None:
        """Every engine rank checks the trainer's tensors and its own engine; the union
        of the problems (same order everywhere) refuses the sync on every rank."""
        mine = (trainer_problems(self.plan, coords, metas)
                + engine_problems(self.plan, self.expected, self.cfg.require_complete)
                if self.is_engine_rank else [])
        problems: list[str] = []
        for found in host_all_gather_object(mine):
            problems += [p for p in found if p not in problems]
        if problems:
            raise WeightSyncError(
                f"weight sync refused before loading anything; the engines stay at policy_version="
                f"{self._version}: " + "; ".join(problems))

    # ------------------------------------------------------------------ transfer

    def _schedule(self, metas: list[dict]) -> list[Bucket]:
        dtypes = {}
        for c, meta in zip(self.coords, metas, strict=True):
            for name, (dt, _) in meta.items():
                dtypes[(c.pp_rank, name)] = _DTYPES[dt]
        return build_buckets(self.plan, dtypes, self.sources, self.cfg.bucket_bytes)

    def _hf_stream(self, buckets: list[Bucket], tensors: Mapping[str, torch.Tensor],
                   progress: dict) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) of every rule, bucket by bucket (engine ranks)."""
        for i, bucket in enumerate(buckets):
            parts = self.transport.collect(bucket, tensors)
            progress["received"] = i + 1
            for rule in bucket.rules:
                ranks = [0] if rule.kind == "replicated" else range(self.plan.tp)
                pieces = [parts.pop((rule.stage, rule.mcore, t)) for t in ranks]
                for name, full in zip(rule.hf, _merge(self.plan, rule, pieces), strict=True):
                    progress["tensors"] += 1
                    progress["bytes"] += full.numel() * full.element_size()
                    yield name, full
                del pieces
            progress["buckets"] = i + 1

    def _drain(self, buckets: list[Bucket], tensors: Mapping[str, torch.Tensor], progress: dict) -> None:
        """The rest of the stream's collectives after a failure (nobody is left waiting)."""
        for bucket in buckets[progress["received"]:]:
            self.transport.collect(bucket, tensors)

    def _stream_into(self, consume: Callable[[Iterator[tuple[str, torch.Tensor]], list[Bucket]], T],
                     buckets: list[Bucket], what: str) -> tuple[str, T | None, dict]:
        """One pass of the stream: engine ranks feed it to ``consume``, the others send.
        Returns (error or "", consume's result, progress) on this rank."""
        tensors = local_tensors(self.module)
        progress = {"received": 0, "tensors": 0, "bytes": 0, "buckets": 0}
        if not self.is_engine_rank:
            self.transport.send(buckets, tensors)
            return "", None, progress
        try:
            return "", consume(self._hf_stream(buckets, tensors, progress), buckets), progress
        except Exception as err:  # agreed on by the caller, re-raised everywhere
            logger.exception("%s failed on rank %d", what, self.rank)
            self._drain(buckets, tensors, progress)
            return f"rank {self.rank}: {type(err).__name__}: {err}", None, progress

    def _load(self, stream: Iterator[tuple[str, torch.Tensor]], buckets: list[Bucket],
              version: int | None) -> int:
        if self._updater is not None:
            names = [n for b in buckets for r in b.rules for n in r.hf]
            return int(self._updater.load(stream, names, version))
        with torch.no_grad():
            return int(self.engine.load_weights(stream, version))

    # ------------------------------------------------------------------ public

    @property
    def policy_version(self) -> int:
        return self._version

    def sync(self, version: int | None = None) -> SyncReport:
        """Collective: stream this step's weights into every engine (see module docstring)."""
        start = time.perf_counter()
        self.transport.reset()
        with PeakRSS() as mem:
            coords, metas = self._gather_meta()
            self._check(coords, metas)
            buckets = self._schedule(metas)
            error, new, progress = self._stream_into(
                lambda stream, b: self._load(stream, b, version), buckets, "engine load")
            verdicts = host_all_gather_object((error, new))
        _raise_first_error(verdicts, "weight sync failed inside an engine")
        versions = sorted({v for _, v in (verdicts[r] for r in self.engine_ranks)})
        if len(versions) != 1:
            raise WeightSyncError(f"engines disagree on the policy version after the sync: {versions}")
        self._version = int(versions[0])
        report = SyncReport(
            policy_version=self._version, num_tensors=progress["tensors"], num_buckets=len(buckets),
            bytes_loaded=progress["bytes"], bytes_sent=self.transport.sent,
            seconds=time.perf_counter() - start, peak_rss_delta_bytes=mem.delta,
            engine_update=self.engine_update, bytes_received=self.transport.received,
        )
        if self.cfg.debug_compare:
            report.debug_max_abs_diff = self.compare(buckets)
        if self.rank == self.engine_ranks[0]:
            logger.info("weight sync v%d: %d tensors, %d buckets, %.1f MB in %.3f s, peak RSS +%.1f MB",
                        report.policy_version, report.num_tensors, report.num_buckets,
                        report.bytes_loaded / 1e6, report.seconds, report.peak_rss_delta_bytes / 1e6)
        logger.debug("weight sync v%d on rank %d: received %.1f MB of %.1f MB", self._version,
                     self.rank, report.bytes_received / 1e6, self.bytes_model / 1e6)
        return report

    def compare(self, buckets: list[Bucket] | None = None) -> float:
        """Collective: max |engine - trainer| over every synced tensor and engine (engine
        dtype), the worst over the engine ranks.

        Gathers the trainer's weights again and reads every engine's back (see
        :class:`~sophiavl_mcore.weight_sync.vllm_access.VllmReadBack`, rollout TP = 1);
        raises :class:`WeightSyncError` on every rank above ``cfg.debug_atol``.
        """
        from sophiavl_mcore.weight_sync.vllm_access import VllmReadBack, engine_model

        if buckets is None:
            buckets = self._schedule(self._gather_meta()[1])

        def worst_diff(stream: Iterator[tuple[str, torch.Tensor]], _b: list[Bucket]) -> tuple[float, str]:
            worst, worst_name, n = 0.0, "", 0
            reader = VllmReadBack(engine_model(self.engine), self.plan.hf_specs())
            with torch.no_grad():
                for name, ours in stream:
                    diff = max((theirs.float() - ours.to(theirs.dtype).float()).abs().max().item()
                               for theirs in reader.views(name))
                    if diff > worst or not worst_name:
                        worst, worst_name = diff, name
                    n += 1
                    if n % 64 == 0:
                        reader.clear()
            return worst, worst_name

        sent, received = self.transport.sent, self.transport.received
        error, result, _ = self._stream_into(worst_diff, buckets, "debug compare")
        self.transport.sent, self.transport.received = sent, received  # a sync's counts only
        verdicts = host_all_gather_object((error, result))
        _raise_first_error(verdicts, "debug compare failed")
        value, name = max((r for _, r in verdicts if r is not None), key=lambda r: r[0])
        if value > self.cfg.debug_atol:
            raise WeightSyncError(
                f"debug compare: engine differs from trainer by {value:.3g} at {name} "
                f"(> weight_sync.debug_atol={self.cfg.debug_atol})"
            )
        return float(value)


def engine_specs(engine: Any) -> dict[str, tuple[int, ...]] | None:
    """Expected ``{HF name: shape}`` of ``engine`` (vLLM: from its checkpoint headers)."""
    from sophiavl_mcore.weight_sync.vllm_access import engine_expected_specs

    return engine_expected_specs(engine)


def _raise_first_error(verdicts: list[tuple[str | None, Any]], what: str) -> None:
    """Every rank's ``(error or None, value)``: raise the first error on every rank."""
    errors = [e for e, _ in verdicts if e]
    if errors:
        raise WeightSyncError(f"{what}: {errors[0]}")
