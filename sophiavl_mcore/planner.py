"""Per-GPU memory plan for a GRPO recipe on a cluster shape (pure arithmetic, no GPU).

Units: parameters are element counts, memory is bytes (reported in GiB = 2**30 bytes;
``gpu_mem_gib=80`` is an H100 80 GB).

Parameter counts come from the checkpoint conversion plan
(:func:`~sophiavl_mcore.checkpoint.build_plan`) — the same per-rank shapes the meta-device
72B proof checks against Megatron-Core — so the planner's counts are exact: summed over
ranks (TP-replicated tensors once per stage) they equal the HF model's count.

Memory terms on the worst pipeline stage, with ``P`` = parameters on one rank of it,
``N`` = whole-model parameters, ``t``/``p``/``d`` = TP/PP/DP sizes:

=================  ============================================================================
weights            2·P (bf16 parameters)
gradients          4·P (fp32 main-grad buffer, Megatron DDP with bf16 params)
optimizer          12·P (fp32 master copy + Adam m + v), divided by d with the distributed
                   optimizer (Megatron's "6 + 12/d bytes per parameter" with the grads above)
activations        per micro-batch and decoder layer, Korthikanti et al. 2022 ("Reducing
                   activation recomputation in large transformer models", eq. 1–2), with
                   s = rollout.max_model_len, b = train.micro_batch_size, h = hidden:
                   none:      s·b·h·(34 + 5·a·s/h) / t   (a = heads; /t needs SP for the 10·sbh
                              layer-norm/dropout part — without SP that part is not divided)
                   selective: 34·s·b·h / t                (attention core recomputed)
                   full:      2·s·b·h / t per layer kept + one layer's ``selective`` working set
                   times layers-in-stage × micro-batches in flight (1F1B: min(p, micro-batches))
logits             2 · 4 · s·b·Vp/t  (fp32 vocab-parallel logits and their gradient, last stage)
reference          2·P when ``reference.offload`` is false (else 0: host-resident)
vllm_weights       2·N / rollout TP (colocated engine shard on every GPU)
kv_cache           gpu_memory_utilization · GPU − vllm_weights (vLLM pre-allocates its pool);
                   a full sequence needs 2·L·kv_heads·head_dim·2 bytes·max_model_len
=================  ============================================================================

Phases (vLLM sleeps during training; trainer state stays resident during rollout):
``rollout`` = weights + gradients + optimizer + vllm_weights + kv_cache;
``train`` = weights + gradients + optimizer + activations + logits + reference.
A layout fits when both phases are ≤ the GPU. Weight sync per step: every engine receives
every tensor once in bf16, 2·N bytes per engine, 2·N / rollout-TP bytes per GPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

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
    weight_sync_bytes_per_engine: int
    weight_sync_bytes_per_gpu: int
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
        lines.append(f"kv cache: {self.kv_tokens_fit:,} tokens fit, max_num_seqs·max_model_len = "
                     f"{self.kv_tokens_wanted:,}")
        lines.append(f"weight sync per step: {self.weight_sync_bytes_per_engine / GIB:.2f} GiB per "
                     f"engine, {self.weight_sync_bytes_per_gpu / GIB:.2f} GiB received per GPU")
        return "\n".join(lines)


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
    per_rank, split, total, vision = [], [], 0, 0
    for stage in range(pp):
        rank, rank_split = 0, 0
        for r in plan.rules_for_stage(stage):
            n = math.prod(plan.rank_shape(r))
            rank += n  # a tied head's mirror copy is real memory on the last stage
            if r.kind != "replicated":
                rank_split += n
            if r.mirror:
                continue
            if r.kind == "vocab":  # padded rows are not model parameters
                total += math.prod(r.hf_shapes[0])
            else:
                total += n if r.kind == "replicated" else n * tp
            if r.mcore.startswith("visual."):
                vision += n
        per_rank.append(rank)
        split.append(rank_split)
    return ParamCounts(total=total, lm=total - vision, vision=vision,
                       per_rank=tuple(per_rank), per_rank_tp_split=tuple(split))


def activation_bytes_per_layer(s: int, b: int, h: int, a: int, t: int, sp: bool,
                               recompute: str) -> int:
    """Korthikanti et al. per-layer activation bytes for one micro-batch (bf16)."""
    if recompute == "full":
        return 2 * s * b * h // (t if sp else 1)
    base = 24 * s * b * h // t + (10 * s * b * h // (t if sp else 1))
    if recompute == "selective":
        return base
    return base + 5 * a * s * s * b // t


def find_model_config(hf_dir: str, explicit: str | None = None) -> dict[str, Any]:
    """``explicit``, else ``<hf_dir>/config.json``, else the shipped public config named
    after the checkpoint directory (``Qwen2.5-VL-72B-Instruct`` →
    ``tools/configs/qwen2_5_vl_72b_instruct.json``)."""
    candidates = [Path(explicit)] if explicit else []
    if hf_dir:
        candidates.append(Path(hf_dir) / "config.json")
        stem = re.sub(r"[^a-z0-9]+", "_", Path(hf_dir).name.lower()).strip("_")
        candidates.append(CONFIG_DIR / f"{stem}.json")
    for c in candidates:
        if c.is_file():
            return json.loads(c.read_text())
    raise PlanError(f"no model config.json: tried {[str(c) for c in candidates]}; "
                    "pass --model-config")


def plan_memory(cfg: Any, cluster: Cluster, config_json: Mapping[str, Any], *,
                recompute: Recompute = "full") -> MemoryPlan:
    """Memory plan of ``cfg`` (a :class:`~sophiavl_mcore.trainer.setup.GRPOTrainConfig`)."""
    from sophiavl_mcore.models.hf_config import padded_vocab_size, read_lm_dims
    from sophiavl_mcore.parallel.layout import stage_layer_counts, validate_layout

    dims = read_lm_dims(config_json)
    par = cfg.parallel
    tp, pp = par.tp, par.pp
    dp = validate_layout(par, cluster.world, dims.num_layers, dims.num_heads, dims.num_kv_heads)
    counts = count_params(config_json, tp, pp, par.layers_per_stage, cfg.model.vocab_divisible_by)
    rtp = cfg.rollout.tensor_parallel_size
    if cluster.world % rtp or cluster.gpus_per_node % rtp:
        raise PlanError(f"rollout.tensor_parallel_size={rtp} must divide gpus_per_node="
                        f"{cluster.gpus_per_node} (engines do not span nodes)")
    s, b, h = cfg.rollout.max_model_len, cfg.train.micro_batch_size, dims.hidden_size
    per_dp = cfg.responses_per_step // dp
    micro = max(1, -(-per_dp // b))
    in_flight = min(pp, micro)
    layers = stage_layer_counts(dims.num_layers, pp, par.layers_per_stage)
    sp = par.sequence_parallel

    def act(kind: str) -> int:
        per_layer = activation_bytes_per_layer(s, b, h, dims.num_heads, tp, sp, kind)
        total = per_layer * max(layers) * in_flight
        if kind == "full":  # the layer being recomputed holds its selective working set
            total += activation_bytes_per_layer(s, b, h, dims.num_heads, tp, sp, "selective")
        return total

    worst = max(range(pp), key=lambda i: counts.per_rank[i])
    p = counts.per_rank[worst]
    opt_div = dp if cfg.optim.use_distributed_optimizer else 1
    vllm_weights = 2 * counts.total // rtp
    gpu = int(cluster.gpu_mem_gib * GIB)
    vllm_pool = int(cfg.rollout.gpu_memory_utilization * gpu)
    kv_heads_rank = max(1, dims.num_kv_heads // rtp)  # vLLM replicates kv heads when rtp > kv
    kv_per_token = 2 * dims.num_layers * kv_heads_rank * dims.head_dim * 2
    kv_cache = max(0, vllm_pool - vllm_weights)
    terms = {
        "weights": 2 * p,
        "gradients": 4 * p,
        "optimizer": 12 * p // opt_div,
        "activations": act(recompute),
        "logits": 2 * 4 * s * b * padded_vocab_size(dims.vocab_size, tp, cfg.model.vocab_divisible_by) // tp,
        "reference": 0 if cfg.reference.offload or not cfg.reference.enabled else 2 * p,
        "vllm_weights": vllm_weights,
        "kv_cache": kv_cache,
    }
    return MemoryPlan(
        params=counts, tp=tp, pp=pp, dp=dp, rollout_tp=rtp, recompute=recompute,
        micro_batches=micro, terms=terms,
        activations_by_recompute={k: act(k) for k in ("none", "selective", "full")},
        kv_bytes_per_token=kv_per_token, kv_seq_bytes=kv_per_token * s, kv_tokens_fit=kv_cache // kv_per_token,
        kv_tokens_wanted=cfg.rollout.max_num_seqs * s,
        weight_sync_bytes_per_engine=2 * counts.total,
        weight_sync_bytes_per_gpu=2 * counts.total // rtp, gpu_bytes=gpu,
    )


def check_fits(plan: MemoryPlan) -> None:
    """Raise :class:`PlanError` naming every overflowing phase/term (with GiB numbers)."""
    problems = plan.overflows()
    if problems:
        raise PlanError("layout does not fit: " + "; ".join(problems))
