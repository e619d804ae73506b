"""The sync's conversion plan from the live layout, and the checks run before anything moves.

Pure functions over what every rank gathers at sync time: each rank's place
(:class:`~sophiavl_mcore.weight_sync.schedule.RankCoord`) and its tensor metadata
``{Megatron name: (dtype name, shape)}``; the engine's expected ``{HF name: full
shape}``. Same inputs on every rank → same plan, same verdict.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sophiavl_mcore.checkpoint.mapping import ConversionPlan, build_plan
from sophiavl_mcore.models.hf_config import read_lm_dims
from sophiavl_mcore.weight_sync.schedule import RankCoord, hf_nbytes

Meta = Mapping[str, tuple[str, tuple[int, ...]]]  # Megatron name -> (dtype name, shape)


def engine_prefix(expected: Mapping[str, Any] | None) -> str:
    """The HF prefix of the engine's language model (transformers-5 VL layout or hub)."""
    names = expected or {}
    return ("model.language_model."
            if any(n.startswith("model.language_model.") for n in names) else "model.")


def layers_per_stage(metas: Sequence[Meta], coords: Sequence[RankCoord], pp: int) -> list[int]:
    """Decoder layers held by each pipeline stage (from the stage-local layer names)."""
    counts = [0] * pp
    for c, meta in zip(coords, metas, strict=True):
        for name in meta:
            if name.startswith("decoder.layers."):
                counts[c.pp_rank] = max(counts[c.pp_rank], int(name.split(".")[2]) + 1)
    return counts


def sync_plan(hf_config: Mapping[str, Any], tp: int, pp: int, coords: Sequence[RankCoord],
              metas: Sequence[Meta], prefix: str) -> ConversionPlan:
    """The HF ⇄ Megatron plan of the live layout (TE or local spec, vocab padding and
    layers per stage read from the gathered tensors; ``prefix``: :func:`engine_prefix`)."""
    te = any(n.endswith("linear_qkv.layer_norm_weight") for m in metas for n in m)
    padded = None
    for m in metas:
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name in m:
                padded = m[name][1][0] * tp
    counts = layers_per_stage(metas, coords, pp)
    # A language-model-only trainer (e.g. text LM of a VL config) has no visual.*
    # tensors: leave the model family's extra rules out of its plan.
    has_extra = any(not n.startswith(("embedding.", "decoder.", "output_layer."))
                    for m in metas for n in m)
    return build_plan(
        read_lm_dims(hf_config), tp, pp,
        layers_per_stage=counts if all(counts) else None, te=te, hf_prefix=prefix,
        vocab_divisible_by=max(1, (padded or tp) // tp),
        config_json=hf_config if has_extra else None,
    )


def trainer_problems(plan: ConversionPlan, coords: Sequence[RankCoord],
                     metas: Sequence[Meta]) -> list[str]:
    """Every rank's tensors against the plan: missing, extra, wrong shape."""
    problems = []
    for c, meta in zip(coords, metas, strict=True):
        specs = plan.rank_specs(c.pp_rank)
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


def engine_problems(plan: ConversionPlan, expected: Mapping[str, tuple[int, ...]] | None,
                    require_complete: bool) -> list[str]:
    """What the plan sends against what the engine accepts (``None``: not checked):
    unknown names (with the closest engine name), shape mismatches and, with
    ``require_complete``, engine tensors nothing would update."""
    if expected is None:
        return []
    sent: dict[str, tuple[int, ...]] = {}
    for r in plan.rules:
        if not r.mirror:
            sent.update(zip(r.hf, (tuple(s) for s in r.hf_shapes), strict=True))
    problems = []
    unknown = [n for n in sent if n not in expected]
    if unknown:
        hints = [f"{n} (closest engine name: {(difflib.get_close_matches(n, expected, 1) or ['-'])[0]})"
                 for n in unknown[:3]]
        problems.append(f"{len(unknown)} tensor name(s) the engine does not have: {hints}")
    bad = [f"{n}: trainer {list(s)} vs engine {list(expected[n])}"
           for n, s in sent.items() if n in expected and tuple(expected[n]) != s]
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es): {bad[:3]}")
    if require_complete:
        tied = {"lm_head.weight"} if plan.dims.tie_word_embeddings else set()
        missing = [n for n in expected if n not in sent and n not in tied]
        if missing:
            problems.append(f"{len(missing)} engine tensor(s) would not be updated, e.g. "
                            f"{missing[:3]} (set weight_sync.require_complete=false for partial syncs)")
    return problems


def hf_bytes_of_plan(plan: ConversionPlan, dtype: torch.dtype) -> int:
    """Total bytes of the HF tensors a sync loads (mirror copies excluded)."""
    return sum(hf_nbytes(r, dtype) for r in plan.rules if not r.mirror)
