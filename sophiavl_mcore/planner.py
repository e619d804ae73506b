"""Per-GPU memory plan for a GRPO recipe on a cluster shape (pure arithmetic, no GPU).

Units: parameters are element counts, memory is bytes (reported in GiB = 2**30 bytes;
``gpu_mem_gib=80`` is an H100 80 GB).

Parameter counts come from the checkpoint conversion plan
(:func:`~sophiavl_mcore.checkpoint.build_plan`) — the same per-rank shapes the meta-device
72B proof checks against Megatron-Core — so the planner's counts are exact: summed over
ranks (TP-replicated tensors once per stage) they equal the HF model's count.

Memory terms on the worst pipeline stage, with ``P`` = parameters on one rank of it,
``N`` = whole-model parameters, ``t``/``p``/``d`` = TP/PP/DP sizes, ``w`` = bytes of a
parameter in ``model.dtype`` (2 for bfloat16, 4 for float32):

=================  ============================================================================
weights            w·P
gradients          4·P (fp32 main-grad buffer of Megatron DDP)
optimizer          (4 + 8)·P with bf16 parameters (fp32 master copy + Adam m + v), 8·P with
                   fp32 ones (no master copy); divided by d with the distributed optimizer
                   (Megatron's "6 + 12/d bytes per parameter" for bf16 with the grads above)
activations        per micro-batch and decoder layer, Korthikanti et al. 2022 ("Reducing
                   activation recomputation in large transformer models", eq. 1–2), with
                   s = rollout.max_model_len, b = train.micro_batch_size, h = hidden:
                   none:      s·b·h·(34 + 5·a·s/h) / t   (a = heads; /t needs SP for the 10·sbh
                              layer-norm/dropout part — without SP that part is not divided)
                   selective: 34·s·b·h / t                (attention core recomputed)
                   full:      2·s·b·h / t per layer kept + one layer's ``selective`` working set
                   times layers-in-stage × micro-batches in flight (1F1B: min(p, micro-batches))
logits             2 · 4 · s·b·Vp/t  (fp32 vocab-parallel logits and their gradient, last stage)
reference          w·P when ``reference.offload`` is false (else 0: host-resident)
vllm_weights       r·N / RTP: this GPU's shard of its rollout engine, r = bytes of
                   ``rollout.dtype`` (2, or 4 for float32; ``auto`` loads bf16 on GPU).
                   vLLM keeps norms whole on every engine rank; they are < 0.01 % of N and
                   left out
kv_cache           gpu_memory_utilization · GPU − vllm_weights (vLLM pre-allocates its pool);
                   a full sequence needs 2·L·kv_heads·head_dim·2 bytes·max_model_len, with
                   kv_heads = max(1, KV heads / RTP) on each engine rank; an engine runs
                   min(max_num_seqs, its responses of the step) sequences at once
=================  ============================================================================

Phases (vLLM sleeps during training; trainer state stays resident during rollout):
``rollout`` = weights + gradients + optimizer + vllm_weights + kv_cache;
``train`` = weights + gradients + optimizer + activations + logits + reference.
A layout fits when both phases are ≤ the GPU.

Rollout topology (:mod:`~sophiavl_mcore.rollout.layout`, the trainer's own check): every
GPU holds one rank of an engine; RTP = ``rollout.tensor_parallel_size`` consecutive ranks
form one engine, ``world / RTP`` engines in all, ``gpus_per_node / RTP`` per node (an
engine never spans nodes), each answering ``prompts_per_step / engines`` prompts.

Weight sync per step (:mod:`~sophiavl_mcore.weight_sync.transport`): each rank receives,
inside its own data-parallel replica, every Megatron piece the replica holds on *other*
ranks, in ``model.dtype``, and merges full HF tensors for its engine shard. With
``split_s`` / ``repl_s`` = TP-split / TP-replicated elements on one rank of stage ``s``
(tied-head mirror copies excluded: they are never sent) and
``M = Σ_s (t·split_s + repl_s)`` = the whole model as Megatron pieces (N plus vocab
padding rows), one rank of stage ``s`` receives ``w·(M − split_s − repl_s)`` bytes —
the same on every TP and DP rank of the stage. Megatron orders ranks tp-dp-pp, so stage
``s`` is ranks ``[s·t·d, (s+1)·t·d)``; the worst rank is on the stage that holds the
fewest elements.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from sophiavl_mcore.rollout.layout import EngineLayout, check_engine_layout

logger = logging.getLogger(__name__)

GIB = 2**30
Recompute = Literal["none", "selective", "full"]
CONFIG_DIR = Path(__file__).resolve().parents[1] / "tools" / "configs"


class PlanError(ValueError):
    """A layout that does not fit; the message names the phase, the term and the GiB."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts (elements)."""

    total: int  # unique parameters of the whole model (LM + vision tower)
    lm: int
    vision: int
    per_rank: tuple[int, ...]  # parameters on one TP rank of each pipeline stage
    per_rank_tp_split: tuple[int, ...]  # of which split over TP (the rest is replicated)
    # What the weight sync moves: elements one TP rank of each stage holds among the
    # pieces it sends (mirror copies excluded), and M = all pieces of one replica.
    sync_own: tuple[int, ...] = ()
    sync_pieces: int = 0


@dataclasses.dataclass(frozen=True)
class SyncPlan:
    """Weight-sync bytes of one step for one rank of each pipeline stage.

    ``received_by_stage[s]``: bytes one rank of stage ``s`` receives per sync;
    ``model_bytes``: the HF tensors of the whole model (bytes, no vocab padding);
    ``engine_shard_bytes``: the engine shard each rank writes (the vllm_weights term);
    ``stage_ranks[s]``: the global ranks of stage ``s``.
    """

    model_bytes: int
    received_by_stage: tuple[int, ...]
    engine_shard_bytes: int
    stage_ranks: tuple[range, ...]

    @property
    def worst_bytes(self) -> int:
        return max(self.received_by_stage)

    @property
    def worst_stages(self) -> list[int]:
        return [s for s, b in enumerate(self.received_by_stage) if b == self.worst_bytes]

    @property
    def worst_rank(self) -> int:
        """The first global rank that receives :attr:`worst_bytes`."""
        return self.stage_ranks[self.worst_stages[0]].start


@dataclasses.dataclass
class MemoryPlan:
    """Per-GPU bytes of each term on the worst stage, and the phases built from them."""

    params: ParamCounts
    tp: int
    pp: int
    dp: int
    rollout_tp: int
    recompute: str
    micro_batches: int
    terms: dict[str, int]
    activations_by_recompute: dict[str, int]
    kv_bytes_per_token: int
    kv_seq_bytes: int  # one max_model_len sequence
    kv_tokens_fit: int
    kv_tokens_wanted: int
    engines: EngineLayout
    engines_per_node: int
    sync: SyncPlan
    gpu_bytes: int

    @property
    def phases(self) -> dict[str, dict[str, int]]:
        t = self.terms
        state = {k: t[k] for k in ("weights", "gradients", "optimizer")}
        return {
            "rollout": {**state, "vllm_weights": t["vllm_weights"], "kv_cache": t["kv_cache"]},
            "train": {**state, "activations": t["activations"], "logits": t["logits"],
                      "reference": t["reference"]},
        }

    def overflows(self) -> list[str]:
        """One line per phase that exceeds the GPU, naming the overflowing term."""
        out = []
        for phase, terms in self.phases.items():
            need = sum(terms.values())
            if need <= self.gpu_bytes:
                continue
            alone = [k for k, v in terms.items() if v > self.gpu_bytes]
            culprit = alone[0] if alone else max(terms, key=terms.__getitem__)
            detail = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in terms.items())
            why = "alone exceeds" if alone else "is the largest term of a phase that exceeds"
            out.append(f"phase {phase}: {need / GIB:.2f} GiB > {self.gpu_bytes / GIB:.2f} GiB per GPU; "
                       f"term {culprit} ({terms[culprit] / GIB:.2f} GiB) {why} the GPU "
                       f"[{detail}]")
        if self.terms["kv_cache"] < self.kv_seq_bytes:
            out.append(f"term kv_cache: vLLM's pool {self.terms['kv_cache'] / GIB:.2f} GiB "
                       f"(gpu_memory_utilization · GPU − vllm_weights "
                       f"{self.terms['vllm_weights'] / GIB:.2f} GiB) cannot hold one "
                       f"max_model_len sequence ({self.kv_seq_bytes / GIB:.2f} GiB)")
        return out

    def table(self) -> str:
        lines = [f"layout tp={self.tp} pp={self.pp} dp={self.dp} rollout_tp={self.rollout_tp} "
                 f"recompute={self.recompute} micro_batches/step/rank={self.micro_batches}",
                 f"params: total {self.params.total:,} (LM {self.params.lm:,} + vision "
                 f"{self.params.vision:,}); per rank by stage {list(self.params.per_rank)}",
                 f"{'term':<14}{'GiB/GPU':>10}"]
        lines += [f"{k:<14}{v / GIB:>10.2f}" for k, v in self.terms.items()]
        lines += [f"activations with recompute={k}: {v / GIB:.2f} GiB"
                  for k, v in self.activations_by_recompute.items()]
        for phase, terms in self.phases.items():
            lines.append(f"phase {phase:<8}{sum(terms.values()) / GIB:>10.2f} GiB of "
                         f"{self.gpu_bytes / GIB:.2f}")
        lines.append(f"kv cache: {self.kv_tokens_fit:,} tokens fit per engine, "
                     f"min(max_num_seqs, responses per engine)·max_model_len = "
                     f"{self.kv_tokens_wanted:,}")
        lines += self.topology_lines()
        return "\n".join(lines)

    def topology_lines(self) -> list[str]:
        """The rollout engines and the weight-sync bytes per rank (GiB)."""
        e, s = self.engines, self.sync
        by_stage = ", ".join(f"stage {i} (ranks {r.start}-{r.stop - 1}) {b / GIB:.2f}"
                             for i, (r, b) in enumerate(zip(s.stage_ranks, s.received_by_stage,
                                                            strict=True)))
        return [
            f"rollout engines: {e.num_engines} of TP={e.rtp} ({self.engines_per_node} per node; "
            f"engine k = ranks {e.rtp}k..{e.rtp}k+{e.rtp - 1}), {e.prompts_per_engine} prompts "
            f"× n={e.n} = {e.responses_per_engine} responses per engine; vLLM shard "
            f"{s.engine_shard_bytes / GIB:.2f} GiB on every GPU",
            f"weight sync per step: model {s.model_bytes / GIB:.2f} GiB; received per rank "
            f"(GiB): {by_stage}",
            f"weight sync worst rank: {s.worst_rank} (stage(s) {s.worst_stages}) receives "
            f"{s.worst_bytes / GIB:.2f} GiB per sync",
        ]


def count_params(config_json: Mapping[str, Any], tp: int, pp: int,
                 layers_per_stage: list[int] | None = None, vocab_divisible_by: int = 1,
                 ) -> ParamCounts:
    """Exact counts from the conversion plan's per-rank shapes (vocab padding included)."""
    import math

    from sophiavl_mcore.checkpoint.mapping import build_plan
    from sophiavl_mcore.models.hf_config import read_lm_dims

    dims = read_lm_dims(config_json)
    plan = build_plan(dims, tp, pp, layers_per_stage=layers_per_stage,
                      vocab_divisible_by=vocab_divisible_by, config_json=config_json)
    per_rank, split, own, total, vision, pieces = [], [], [], 0, 0, 0
    for stage in range(pp):
        rank, rank_split, rank_own = 0, 0, 0
        for r in plan.rules_for_stage(stage):
            n = math.prod(plan.rank_shape(r))
            rank += n  # a tied head's mirror copy is real memory on the last stage
            if r.kind != "replicated":
                rank_split += n
            if r.mirror:
                continue
            rank_own += n
            pieces += n if r.kind == "replicated" else n * tp
            if r.kind == "vocab":  # padded rows are not model parameters
                total += math.prod(r.hf_shapes[0])
            else:
                total += n if r.kind == "replicated" else n * tp
            if r.mcore.startswith("visual."):
                vision += n
        per_rank.append(rank)
        split.append(rank_split)
        own.append(rank_own)
    return ParamCounts(total=total, lm=total - vision, vision=vision,
                       per_rank=tuple(per_rank), per_rank_tp_split=tuple(split),
                       sync_own=tuple(own), sync_pieces=pieces)


def plan_sync(counts: ParamCounts, tp: int, dp: int, param_bytes: int,
              engine_shard_bytes: int) -> SyncPlan:
    """Bytes one rank of each stage receives per sync: ``w·(M − own_s)`` (module docstring)."""
    replica = tp * dp  # ranks of one stage (Megatron order tp-dp-pp)
    return SyncPlan(
        model_bytes=param_bytes * counts.total,
        received_by_stage=tuple(param_bytes * (counts.sync_pieces - own) for own in counts.sync_own),
        engine_shard_bytes=engine_shard_bytes,
        stage_ranks=tuple(range(s * replica, (s + 1) * replica) for s in range(len(counts.sync_own))),
    )


def activation_bytes_per_layer(s: int, b: int, h: int, a: int, t: int, sp: bool,
                               recompute: str) -> int:
    """Korthikanti et al. per-layer activation bytes for one micro-batch (bf16)."""
    if recompute == "full":
        return 2 * s * b * h // (t if sp else 1)
    base = 24 * s * b * h // t + (10 * s * b * h // (t if sp else 1))
    if recompute == "selective":
        return base
    return base + 5 * a * s * s * b // t


def model_config_path(hf_dir: str, explicit: str | None = None) -> Path:
    """Where the model's config.json is read from: ``explicit``, else
    ``<hf_dir>/config.json``, else the shipped public config named after the checkpoint
    directory — its name lower-cased, every run of other characters than ``a-z0-9``
    turned into ``_`` (``/path/to/Qwen2.5-VL-72B-Instruct`` →
    ``tools/configs/qwen2_5_vl_72b_instruct.json``). Raises :class:`PlanError` listing
    every path tried."""
    candidates = [Path(explicit)] if explicit else []
    if hf_dir:
        candidates.append(Path(hf_dir) / "config.json")
        candidates.append(shipped_config_path(hf_dir))
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(p.name for p in CONFIG_DIR.glob("*.json"))
    raise PlanError(f"no model config.json: tried {[str(c) for c in candidates]}; shipped "
                    f"configs in {CONFIG_DIR}: {shipped}")


def shipped_config_path(hf_dir: str) -> Path:
    """``tools/configs/<normalised name of hf_dir>.json`` (it may not exist)."""
    stem = re.sub(r"[^a-z0-9]+", "_", Path(hf_dir).name.lower()).strip("_")
    return CONFIG_DIR / f"{stem}.json"


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2  # bfloat16 / float16; vLLM's "auto" on GPU too


def plan_topology(cfg: Any, cluster: Cluster, config_json: Mapping[str, Any], dp: int,
                  ) -> tuple[EngineLayout, int]:
    """The rollout engines (the trainer's own check, every number in its error) and the
    engines per node; also refuses responses that do not split over ``dp``."""
    from sophiavl_mcore.models.hf_config import read_lm_dims

    dims = read_lm_dims(config_json)
    vision_heads = (config_json.get("vision_config") or {}).get("num_heads")
    layout = check_engine_layout(cluster.world, cfg.rollout.tensor_parallel_size,
                                 cfg.train.prompts_per_step, cfg.rollout.sampling.n,
                                 num_heads=dims.num_heads, num_kv_heads=dims.num_kv_heads,
                                 vision_heads=vision_heads, ranks_per_node=cluster.gpus_per_node)
    if cfg.responses_per_step % dp:
        raise PlanError(f"train.prompts_per_step={cfg.train.prompts_per_step} × rollout.sampling.n="
                        f"{cfg.rollout.sampling.n} = {cfg.responses_per_step} responses do not "
                        f"split over dp={dp}")
    return layout, cluster.gpus_per_node // layout.rtp


def plan_memory(cfg: Any, cluster: Cluster, config_json: Mapping[str, Any], *,
                recompute: Recompute = "full") -> MemoryPlan:
    """Memory plan of ``cfg`` (a :class:`~sophiavl_mcore.trainer.grpo.config.GRPOTrainConfig`)."""
    from sophiavl_mcore.models.hf_config import padded_vocab_size, read_lm_dims
    from sophiavl_mcore.parallel.layout import stage_layer_counts, validate_layout

    dims = read_lm_dims(config_json)
    par = cfg.parallel
    tp, pp = par.tp, par.pp
    dp = validate_layout(par, cluster.world, dims.num_layers, dims.num_heads, dims.num_kv_heads)
    engines, per_node = plan_topology(cfg, cluster, config_json, dp)
    counts = count_params(config_json, tp, pp, par.layers_per_stage, cfg.model.vocab_divisible_by)
    rtp = engines.rtp
    s, b, h = cfg.rollout.max_model_len, cfg.train.micro_batch_size, dims.hidden_size
    micro = max(1, -(-(cfg.responses_per_step // dp) // b))
    in_flight = min(pp, micro)
    layers = stage_layer_counts(dims.num_layers, pp, par.layers_per_stage)
    sp = par.sequence_parallel

    def act(kind: str) -> int:
        per_layer = activation_bytes_per_layer(s, b, h, dims.num_heads, tp, sp, kind)
        total = per_layer * max(layers) * in_flight
        if kind == "full":  # the layer being recomputed holds its selective working set
            total += activation_bytes_per_layer(s, b, h, dims.num_heads, tp, sp, "selective")
        return total

    p = max(counts.per_rank)
    w = _dtype_bytes(cfg.model.dtype)
    opt_div = dp if cfg.optim.use_distributed_optimizer else 1
    vllm_weights = _dtype_bytes(cfg.rollout.dtype) * counts.total // rtp
    gpu = int(cluster.gpu_mem_gib * GIB)
    vllm_pool = int(cfg.rollout.gpu_memory_utilization * gpu)
    kv_heads_rank = max(1, dims.num_kv_heads // rtp)  # vLLM replicates kv heads when rtp > kv
    kv_per_token = 2 * dims.num_layers * kv_heads_rank * dims.head_dim * 2
    kv_cache = max(0, vllm_pool - vllm_weights)
    terms = {
        "weights": w * p,
        "gradients": 4 * p,
        "optimizer": ((4 if w == 2 else 0) + 8) * p // opt_div,
        "activations": act(recompute),
        "logits": 2 * 4 * s * b * padded_vocab_size(dims.vocab_size, tp, cfg.model.vocab_divisible_by) // tp,
        "reference": 0 if cfg.reference.offload or not cfg.reference.enabled else w * p,
        "vllm_weights": vllm_weights,
        "kv_cache": kv_cache,
    }
    return MemoryPlan(
        params=counts, tp=tp, pp=pp, dp=dp, rollout_tp=rtp, recompute=recompute,
        micro_batches=micro, terms=terms,
        activations_by_recompute={k: act(k) for k in ("none", "selective", "full")},
        kv_bytes_per_token=kv_per_token, kv_seq_bytes=kv_per_token * s, kv_tokens_fit=kv_cache // kv_per_token,
        kv_tokens_wanted=min(cfg.rollout.max_num_seqs, engines.responses_per_engine) * s, engines=engines, engines_per_node=per_node,
        sync=plan_sync(counts, tp, dp, w, vllm_weights), gpu_bytes=gpu,
    )


def check_fits(plan: MemoryPlan) -> None:
    """Raise :class:`PlanError` naming every overflowing phase/term (with GiB numbers)."""
    problems = plan.overflows()
    if problems:
        raise PlanError("layout does not fit: " + "; ".join(problems))
