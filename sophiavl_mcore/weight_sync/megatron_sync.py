"""Megatron (TP shards × PP stages) → colocated rollout engine, in size-bounded buckets.

Topology (CPU, colocated): every trainer rank runs this; the engine lives in one
process, global rank ``cfg.engine_rank`` (rank 0 by default). For each bucket (see
:mod:`~sophiavl_mcore.weight_sync.schedule`) the data-parallel-replica-0 rank of each
(PP stage, TP rank) packs its pieces into one flat buffer per dtype and sends it to the
engine rank (gloo point-to-point); the engine rank merges the TP pieces of each rule
into full HF tensors (``ConversionPlan.merge``: q/k/v de-interleave, gate/up split,
vocab padding dropped) under *global* layer indices (the plan maps stage-local
``decoder.layers.i`` to ``model.layers.{offset+i}``) and yields them, lazily, into one
engine write per sync. Because the engine receives full HF tensors and shards them
itself, the trainer's TP/PP and the rollout's TP are independent.

Engine write (``cfg.engine_update``): ``inplace`` (default where supported) copies each
tensor straight into the engine's parameters through the model's own ``load_weights``
(:mod:`~sophiavl_mcore.weight_sync.vllm_inplace`; on CPU, packed GEMM layers are
re-packed once each, :mod:`~sophiavl_mcore.weight_sync.vllm_repack`); ``live`` (CPU
opt-in) switches written layers to a GEMM on the plain weight instead (one copy per
byte, slower generation); ``reload`` uses vLLM's ``reload_weights`` (layer-wise meta
restore + ``process_weights_after_loading`` of the whole model). Each is one call per
sync, never per bucket; every weight-derived cache is dropped after it.

Generalisation (GPU): one engine per rollout group (e.g. per DP replica, or per
rollout-TP group of GPUs); each group's engine-holding rank(s) receive the same bucket
stream — the gather to one rank becomes a gather inside each stage's TP group (NCCL
all-gather of a bucket) followed by a broadcast from each stage leader to the engine
holders of every group, and the vLLM TP workers each slice their shard from the full
tensor in their own loader. The schedule and validation here do not change.

Memory: a sender holds one packed buffer of its share of one bucket; the engine rank
holds one bucket of received pieces plus the merged tensors of the rule being loaded
(the engine copies each layer in as soon as its tensors are complete). Peak RSS is
measured and returned in the :class:`SyncReport`.

Failure: names, shapes and the rank layout are validated against the engine's expected
tensors *before* anything is sent, so a bad name or shape raises
:class:`WeightSyncError` on every rank with the engine untouched (previous weights,
previous ``policy_version``). A failure inside the engine after validation (not
expected) still drains every pending message so that no rank hangs, and is re-raised
everywhere.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sophiavl_mcore.checkpoint.mapping import ConversionPlan, build_plan
from sophiavl_mcore.models.hf_config import load_config_json, read_lm_dims
from sophiavl_mcore.models.unwrap import checkpoint_view
from sophiavl_mcore.parallel.collectives import run_on_rank
from sophiavl_mcore.weight_sync.config import WeightSyncConfig
from sophiavl_mcore.weight_sync.interface import SyncReport, WeightSync, WeightSyncError
from sophiavl_mcore.weight_sync.memory import PeakRSS
from sophiavl_mcore.weight_sync.schedule import (
    Bucket,
    RankCoord,
    build_buckets,
    hf_nbytes,
    source_table,
)

logger = logging.getLogger(__name__)

_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def _one_chunk(model: torch.nn.Module | Sequence[torch.nn.Module]) -> torch.nn.Module:
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise NotImplementedError(
                f"weight sync got {len(model)} model chunks; virtual pipeline stages are not supported"
            )
        model = model[0]
    return model


def _local_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _layers_per_stage(metas: list[dict], coords: list[RankCoord], pp: int) -> list[int]:
    counts = [0] * pp
    for c, meta in zip(coords, metas, strict=True):
        for name in meta:
            if name.startswith("decoder.layers."):
                counts[c.pp_rank] = max(counts[c.pp_rank], int(name.split(".")[2]) + 1)
    return counts


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


class MegatronWeightSync(WeightSync):
    """:class:`WeightSync` from a live Megatron model (any TP × PP) into a colocated engine.

    Args:
        model: this rank's model (GPTModel, Qwen25VLModel, or a one-chunk list; DDP /
            Float16Module wrappers are unwrapped).
        hf_config: the policy's HF ``config.json`` (path, dir or dict).
        engine: the :class:`~sophiavl_mcore.rollout.RolloutEngine` on
            ``cfg.engine_rank``; ``None`` on every other rank.
        cfg: bucket size, engine rank, debug compare.
        plan: override the conversion plan (tests; e.g. to rename a tensor).
        expected_specs: ``{HF name: full shape}`` the engine accepts; default: read
            from the engine's checkpoint (engine rank only).

    Construction is collective (every trainer rank, after ``initialize_parallel``).
    """

    def __init__(
        self,
        model: Any,
        hf_config: Mapping[str, Any] | str | Path,
        engine: Any = None,
        cfg: WeightSyncConfig | None = None,
        *,
        plan: ConversionPlan | None = None,
        expected_specs: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:

        self.cfg = cfg or WeightSyncConfig()
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        if self.cfg.engine_rank >= self.world:
            raise ValueError(f"weight_sync.engine_rank={self.cfg.engine_rank} but world_size={self.world}")
        self.is_engine_rank = self.rank == self.cfg.engine_rank
        self.engine = engine
        self._bind(model, hf_config)
        self.expected = None
        if self.is_engine_rank:
            if engine is None:
                raise ValueError(f"rank {self.rank} is weight_sync.engine_rank but got no engine")
            self.expected = dict(expected_specs) if expected_specs is not None else engine_specs(engine)
            if self.expected is None:
                logger.warning("engine exposes no expected tensors; names/shapes are not pre-checked")
        elif engine is not None:
            raise ValueError(f"rank {self.rank} got an engine but weight_sync.engine_rank={self.cfg.engine_rank}")

        self._updater = self._make_updater() if self.is_engine_rank else None
        coords, metas = self._gather_meta()
        self.coords = coords
        self.sources = source_table(coords, self.tp, self.pp)
        self.plan = plan if plan is not None else self._build_plan(coords, metas)

        def engine_state() -> tuple[int, str]:
            kind = "reload" if self._updater is None else ("live" if self._updater.live else "inplace")
            return int(getattr(engine, "policy_version", 0)), kind

        self._version, update = run_on_rank(engine_state, src=self.cfg.engine_rank)
        self.engine_update: str = update  # how the engine takes weights (every rank)

    # ------------------------------------------------------------------ setup

    def _bind(self, model: Any, hf_config: Mapping[str, Any] | str | Path) -> None:
        """This rank's model stage, its place in the layout and the HF config."""
        from megatron.core import parallel_state as ps

        self.module = checkpoint_view(_one_chunk(model))
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.coord = RankCoord(self.rank, ps.get_tensor_model_parallel_rank(),
                               ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank())
        self.hf_config = load_config_json(hf_config)

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

    def _gather_meta(self) -> tuple[list[RankCoord], list[dict[str, tuple[str, tuple[int, ...]]]]]:
        meta = {k: (str(v.dtype), tuple(v.shape)) for k, v in _local_tensors(self.module).items()}
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, (self.coord, meta))
        return [o[0] for o in out], [o[1] for o in out]

    def _build_plan(self, coords: list[RankCoord], metas: list[dict]) -> ConversionPlan:
        def engine_prefix() -> str:
            names = self.expected or {}
            return ("model.language_model."
                    if any(n.startswith("model.language_model.") for n in names) else "model.")

        prefix = run_on_rank(engine_prefix, src=self.cfg.engine_rank)
        te = any(n.endswith("linear_qkv.layer_norm_weight") for m in metas for n in m)
        padded = None
        for m in metas:
            for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                if name in m:
                    padded = m[name][1][0] * self.tp
        counts = _layers_per_stage(metas, coords, self.pp)
        # A language-model-only trainer (e.g. text LM of a VL config) has no visual.*
        # tensors: leave the model family's extra rules out of its plan.
        has_extra = any(not n.startswith(("embedding.", "decoder.", "output_layer."))
                        for m in metas for n in m)
        return build_plan(
            read_lm_dims(self.hf_config), self.tp, self.pp,
            layers_per_stage=counts if all(counts) else None, te=te, hf_prefix=prefix,
            vocab_divisible_by=max(1, (padded or self.tp) // self.tp),
            config_json=self.hf_config if has_extra else None,
        )

    # ------------------------------------------------------------------ validation

    def _trainer_problems(self, coords: list[RankCoord], metas: list[dict]) -> list[str]:
        problems = []
        for c, meta in zip(coords, metas, strict=True):
            specs = self.plan.rank_specs(c.pp_rank)
            where = f"rank {c.rank} (tp_rank={c.tp_rank}, pp_rank={c.pp_rank})"
            missing = sorted(set(specs) - set(meta))
            extra = sorted(set(meta) - set(specs))
            shapes = [f"{n} {list(meta[n][1])} vs plan {list(specs[n])}"
                      for n in sorted(set(specs) & set(meta)) if tuple(meta[n][1]) != tuple(specs[n])]
            if missing:
                problems.append(f"{where}: {len(missing)} Megatron tensor(s) missing, e.g. {missing[:3]}")
            if extra:
                problems.append(f"{where}: {len(extra)} Megatron tensor(s) not in the plan, e.g. {extra[:3]}")
            if shapes:
                problems.append(f"{where}: shape mismatch {shapes[:3]}")
        return problems

    def _engine_problems(self) -> list[str]:
        if self.expected is None:
            return []
        sent: dict[str, tuple[int, ...]] = {}
        for r in self.plan.rules:
            if not r.mirror:
                sent.update(zip(r.hf, (tuple(s) for s in r.hf_shapes), strict=True))
        problems = []
        unknown = [n for n in sent if n not in self.expected]
        if unknown:
            hints = [f"{n} (closest engine name: {(difflib.get_close_matches(n, self.expected, 1) or ['-'])[0]})"
                     for n in unknown[:3]]
            problems.append(f"{len(unknown)} tensor name(s) the engine does not have: {hints}")
        bad = [f"{n}: trainer {list(s)} vs engine {list(self.expected[n])}"
               for n, s in sent.items() if n in self.expected and tuple(self.expected[n]) != s]
        if bad:
            problems.append(f"{len(bad)} shape mismatch(es): {bad[:3]}")
        if self.cfg.require_complete:
            tied = {"lm_head.weight"} if self.plan.dims.tie_word_embeddings else set()
            missing = [n for n in self.expected if n not in sent and n not in tied]
            if missing:
                problems.append(f"{len(missing)} engine tensor(s) would not be updated, e.g. "
                                f"{missing[:3]} (set weight_sync.require_complete=false for partial syncs)")
        return problems

    def _check(self, coords: list[RankCoord], metas: list[dict]) -> None:
        problems = run_on_rank(lambda: self._trainer_problems(coords, metas) + self._engine_problems(),
                               src=self.cfg.engine_rank)
        if problems:
            raise WeightSyncError(
                f"weight sync refused before loading anything; the engine stays at policy_version="
                f"{self._version}: " + "; ".join(problems)
            )

    # ------------------------------------------------------------------ transfer

    def _schedule(self, metas: list[dict]) -> list[Bucket]:
        dtypes = {}
        for c, meta in zip(self.coords, metas, strict=True):
            for name, (dt, _) in meta.items():
                dtypes[(c.pp_rank, name)] = _DTYPES[dt]
        return build_buckets(self.plan, dtypes, self.sources, self.cfg.bucket_bytes)

    def _send(self, buckets: list[Bucket], tensors: Mapping[str, torch.Tensor]) -> int:
        sent = 0
        for bucket in buckets:
            for src, dtype in bucket.senders():
                if src != self.rank:
                    continue
                flat = torch.cat([tensors[p.rule.mcore].detach().reshape(-1)
                                  for p in bucket.pieces_from(src, dtype)])
                dist.send(flat, dst=self.cfg.engine_rank)
                sent += flat.numel() * flat.element_size()
                del flat
        return sent

    def _collect(self, bucket: Bucket, tensors: Mapping[str, torch.Tensor]) -> dict:
        """Every piece of ``bucket`` on the engine rank: ``{(stage, mcore, tp_rank): tensor}``."""
        parts = {}
        for src, dtype in bucket.senders():
            pieces = bucket.pieces_from(src, dtype)
            if src == self.rank:
                for p in pieces:
                    parts[(p.rule.stage, p.rule.mcore, p.tp_rank)] = tensors[p.rule.mcore].detach()
                continue
            buf = torch.empty(sum(torch.Size(p.shape).numel() for p in pieces), dtype=dtype)
            dist.recv(buf, src=src)
            offset = 0
            for p in pieces:
                n = torch.Size(p.shape).numel()
                parts[(p.rule.stage, p.rule.mcore, p.tp_rank)] = buf[offset:offset + n].view(p.shape)
                offset += n
        return parts

    def _hf_stream(self, buckets: list[Bucket], tensors: Mapping[str, torch.Tensor],
                   progress: dict) -> Iterator[tuple[str, torch.Tensor]]:
        for i, bucket in enumerate(buckets):
            parts = self._collect(bucket, tensors)
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
        for bucket in buckets[progress["received"]:]:
            self._collect(bucket, tensors)

    # ------------------------------------------------------------------ public

    @property
    def policy_version(self) -> int:
        return self._version

    def sync(self, version: int | None = None) -> SyncReport:
        """Collective: stream this step's weights into the engine (see module docstring)."""
        start = time.perf_counter()
        with PeakRSS() as mem:
            coords, metas = self._gather_meta()
            self._check(coords, metas)
            buckets = self._schedule(metas)
            tensors = _local_tensors(self.module)
            progress = {"received": 0, "tensors": 0, "bytes": 0, "buckets": 0}
            sent = 0
            status: list[Any] = [None]
            if self.is_engine_rank:
                try:
                    stream = self._hf_stream(buckets, tensors, progress)
                    if self._updater is not None:
                        names = [n for b in buckets for r in b.rules for n in r.hf]
                        new = self._updater.load(stream, names, version)
                    else:
                        with torch.no_grad():
                            new = self.engine.load_weights(stream, version)
                    status[0] = ("ok", int(new))
                except Exception as err:  # re-raised on every rank below
                    logger.exception("engine load failed")
                    self._drain(buckets, tensors, progress)
                    status[0] = ("error", f"{type(err).__name__}: {err}")
            else:
                sent = self._send(buckets, tensors)
            dist.broadcast_object_list(status, src=self.cfg.engine_rank)
        if status[0][0] != "ok":
            raise WeightSyncError(f"weight sync failed inside the engine: {status[0][1]}")
        self._version = status[0][1]
        report = SyncReport(
            policy_version=self._version, num_tensors=progress["tensors"], num_buckets=len(buckets),
            bytes_loaded=progress["bytes"], bytes_sent=sent, seconds=time.perf_counter() - start,
            peak_rss_delta_bytes=mem.delta, engine_update=self.engine_update,
        )
        if self.cfg.debug_compare:
            report.debug_max_abs_diff = self.compare(buckets)
        if self.rank == self.cfg.engine_rank:
            logger.info("weight sync v%d: %d tensors, %d buckets, %.1f MB in %.3f s, peak RSS +%.1f MB",
                        report.policy_version, report.num_tensors, report.num_buckets,
                        report.bytes_loaded / 1e6, report.seconds, report.peak_rss_delta_bytes / 1e6)
        return report

    def compare(self, buckets: list[Bucket] | None = None) -> float:
        """Collective: max |engine - trainer| over every synced tensor (engine dtype).

        Gathers the trainer's weights again and reads the engine's back (see
        :class:`~sophiavl_mcore.weight_sync.vllm_access.VllmReadBack`); raises
        :class:`WeightSyncError` on every rank above ``cfg.debug_atol``.
        """
        from sophiavl_mcore.weight_sync.vllm_access import VllmReadBack, engine_model

        if buckets is None:
            buckets = self._schedule(self._gather_meta()[1])
        tensors = _local_tensors(self.module)
        result: list[Any] = [None]
        if self.is_engine_rank:
            progress = {"received": 0, "tensors": 0, "bytes": 0, "buckets": 0}
            worst, worst_name = 0.0, ""
            try:
                reader = VllmReadBack(engine_model(self.engine), self.plan.hf_specs())
                with torch.no_grad():
                    for name, ours in self._hf_stream(buckets, tensors, progress):
                        diff = max((theirs.float() - ours.to(theirs.dtype).float()).abs().max().item()
                                   for theirs in reader.views(name))
                        if diff > worst or not worst_name:
                            worst, worst_name = diff, name
                        if progress["tensors"] % 64 == 0:
                            reader.clear()
                result[0] = ("ok", worst, worst_name)
            except Exception as err:
                logger.exception("debug compare failed")
                self._drain(buckets, tensors, progress)
                result[0] = ("error", f"{type(err).__name__}: {err}", "")
        else:
            self._send(buckets, tensors)
        dist.broadcast_object_list(result, src=self.cfg.engine_rank)
        kind, value, name = result[0]
        if kind != "ok":
            raise WeightSyncError(f"debug compare failed: {value}")
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


def hf_bytes_of_plan(plan: ConversionPlan, dtype: torch.dtype) -> int:
    """Total bytes of the HF tensors a sync loads (mirror copies excluded)."""
    return sum(hf_nbytes(r, dtype) for r in plan.rules if not r.mirror)
