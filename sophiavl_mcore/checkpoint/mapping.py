"""HF ⇄ Megatron name/layout map for the Qwen2 LM, for any TP × PP layout.

A :class:`Rule` ties one Megatron tensor (a local name on pipeline stage ``stage``,
present on every TP rank of that stage) to the HF tensor(s) it is made of, and a
``kind`` saying how it is split over TP:

=============  ==========================================================================
kind           Megatron tensor on TP rank r of tp
=============  ==========================================================================
replicated     the HF tensor unchanged (norm weights; part B's ``visual.*`` tensors)
vocab          HF [V, h] zero-padded to [Vp, h], rows r·Vp/tp … (embedding, output head)
column         HF [o, i] rows r·o/tp … (column-parallel output split)
row            HF [o, i] columns r·i/tp … (row-parallel input split: o_proj, down_proj)
qkv            q/k/v [n·d, h] (or biases [n·d]) regrouped per query group g as
               [q heads of g, k_g, v_g], groups r·ng/tp … on rank r
gate_up        cat(gate rows r·f/tp …, up rows r·f/tp …)
=============  ==========================================================================

Layer indices are local to a pipeline stage in Megatron names (``decoder.layers.{i}``)
and global in HF names. TE specs fuse the pre-attention / pre-MLP RMSNorm into the
following linear (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``).

Extra tensors beyond the LM are added per ``model_type``: Qwen2.5-VL's vision tower
(``visual.*``, :func:`vision_conversion_rules`) is built in; :func:`register_extra_rules`
lets another model family add its own. They take part in conversion, validation and the
72B proof exactly like LM rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from sophiavl_mcore.models.hf_config import Qwen2Dims, padded_vocab_size
from sophiavl_mcore.parallel.layout import stage_layer_counts, stage_layer_offsets

if TYPE_CHECKING:
    import torch

Kind = Literal["replicated", "vocab", "column", "row", "qkv", "gate_up"]


@dataclasses.dataclass(frozen=True)
class Rule:
    """One Megatron tensor ⇄ HF tensor(s). ``hf_shapes`` are the full HF shapes."""

    mcore: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    kind: Kind
    stage: int
    mirror: bool = False  # a second copy of an HF tensor (tied output head on the last stage)


@dataclasses.dataclass
class ConversionPlan:
    """All rules for one model + layout, with shape arithmetic and split/merge."""

    dims: Qwen2Dims
    tp: int
    pp: int
    layers_per_stage: list[int]
    te: bool
    hf_prefix: str
    vocab_padded: int
    rules: list[Rule]

    # ----------------------------------------------------------- shapes
    def rank_shape(self, rule: Rule) -> tuple[int, ...]:
        """Shape of ``rule``'s tensor on one TP rank."""
        tp, shp = self.tp, rule.hf_shapes
        if rule.kind == "replicated":
            return shp[0]
        if rule.kind == "vocab":
            return (self.vocab_padded // tp, *shp[0][1:])
        if rule.kind == "column":
            return (shp[0][0] // tp, *shp[0][1:])
        if rule.kind == "row":
            return (shp[0][0], shp[0][1] // tp)
        if rule.kind == "qkv":
            rows = sum(s[0] for s in shp) // tp
            return (rows, *shp[0][1:])
        if rule.kind == "gate_up":
            return (2 * shp[0][0] // tp, *shp[0][1:])
        raise ValueError(f"unknown rule kind {rule.kind}")

    def rules_for_stage(self, stage: int) -> list[Rule]:
        return [r for r in self.rules if r.stage == stage]

    def rank_specs(self, pp_rank: int) -> dict[str, tuple[int, ...]]:
        """``{megatron name: shape}`` on any TP rank of stage ``pp_rank``."""
        return {r.mcore: self.rank_shape(r) for r in self.rules_for_stage(pp_rank)}

    def hf_specs(self) -> dict[str, tuple[int, ...]]:
        """``{HF name: shape}`` of every HF tensor covered by the plan."""
        out: dict[str, tuple[int, ...]] = {}
        for r in self.rules:
            out.update(zip(r.hf, r.hf_shapes, strict=True))
        return out

    # ----------------------------------------------------------- split / merge
    def shard_pieces(
        self, rule: Rule, hf: Sequence[torch.Tensor], tp_rank: int
    ) -> list[torch.Tensor]:
        """Like :meth:`shard` but as dim-0 pieces (avoids a concatenation copy)."""
        if rule.kind == "gate_up":
            return [hf[0].chunk(self.tp, 0)[tp_rank], hf[1].chunk(self.tp, 0)[tp_rank]]
        return [self.shard(rule, hf, tp_rank)]

    def shard(self, rule: Rule, hf: Sequence[torch.Tensor], tp_rank: int) -> torch.Tensor:
        """The Megatron tensor of ``rule`` on ``tp_rank`` from the full HF tensor(s)."""
        import torch  # here: the plan's shape arithmetic imports without torch (tools/plan.py)

        tp, r = self.tp, tp_rank
        if rule.kind == "replicated":
            return hf[0]
        if rule.kind == "vocab":
            rows = self.vocab_padded // tp
            lo, hi = r * rows, (r + 1) * rows
            w = hf[0]
            real = w[lo:min(hi, w.shape[0])]
            if real.shape[0] == rows:
                return real
            pad = torch.zeros((rows - real.shape[0], *w.shape[1:]), dtype=w.dtype)
            return torch.cat([real, pad]) if real.shape[0] > 0 else pad
        if rule.kind == "column":
            return hf[0].chunk(tp, dim=0)[r]
        if rule.kind == "row":
            return hf[0].chunk(tp, dim=1)[r]
        if rule.kind == "gate_up":
            return torch.cat([hf[0].chunk(tp, 0)[r], hf[1].chunk(tp, 0)[r]])
        if rule.kind == "qkv":
            d, ng = self.dims.head_dim, self.dims.num_kv_heads
            per = self.dims.num_heads // ng
            tail = hf[0].shape[1:]
            q = hf[0].reshape(ng, per * d, *tail)
            k = hf[1].reshape(ng, d, *tail)
            v = hf[2].reshape(ng, d, *tail)
            grouped = torch.cat([q, k, v], dim=1).chunk(tp, dim=0)[r]
            return grouped.reshape(-1, *tail)
        raise ValueError(f"unknown rule kind {rule.kind}")

    def merge(self, rule: Rule, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Full HF tensor(s) of ``rule`` from its TP-rank tensors (rank order)."""
        import torch

        if rule.kind == "replicated":
            return [parts[0]]
        if rule.kind == "vocab":
            return [torch.cat(list(parts))[: rule.hf_shapes[0][0]]]
        if rule.kind == "column":
            return [torch.cat(list(parts))]
        if rule.kind == "row":
            return [torch.cat(list(parts), dim=1)]
        if rule.kind == "gate_up":
            halves = [p.chunk(2, dim=0) for p in parts]
            return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
        if rule.kind == "qkv":
            return self._merge_qkv(parts)
        raise ValueError(f"unknown rule kind {rule.kind}")

    def _merge_qkv(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """HF q, k, v [heads·d, ...] from the TP ranks' fused qkv (rows grouped per KV
        head: [q of the group, k, v]); each byte is copied once, straight into place
        (the live weight sync runs this every step)."""
        import torch

        d, groups = self.dims.head_dim, self.dims.num_kv_heads
        rows = (self.dims.num_heads // groups * d, d, d)
        tail = tuple(parts[0].shape[1:])
        outs = [torch.empty((groups * n, *tail), dtype=parts[0].dtype) for n in rows]
        views = [o.view(groups, n, *tail) for o, n in zip(outs, rows, strict=True)]
        first = 0
        for part in parts:
            grouped = part.reshape(-1, sum(rows), *tail)  # a view for contiguous parts
            for view, piece in zip(views, grouped.split(rows, dim=1), strict=True):
                view[first:first + grouped.shape[0]].copy_(piece)
            first += grouped.shape[0]
        return outs


# --------------------------------------------------------------- extension registry

RuleProvider = Callable[[Mapping[str, Any], "ConversionPlan"], list[Rule]]


def vision_hf_prefix(lm_hf_prefix: str) -> str:
    """HF name prefix of the vision tower's tensors, consistent with the LM's prefix.

    Hub files (and ``save_pretrained``) use ``model.`` for the LM and ``visual.`` for the
    tower; transformers-5 in-memory state dicts use ``model.language_model.`` and
    ``model.visual.``.
    """
    return "model.visual." if lm_hf_prefix.startswith("model.language_model.") else "visual."


# transformers' Qwen2_5_VLVisionConfig defaults, for fields a config.json leaves out.
_VISION_DEFAULTS = {"depth": 32, "hidden_size": 3584, "intermediate_size": 3420,
                    "out_hidden_size": 3584, "in_channels": 3, "temporal_patch_size": 2,
                    "patch_size": 14, "spatial_merge_size": 2}


def vision_param_shapes(config_json: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of Qwen2.5-VL's vision tower, in the order of
    transformers' ``Qwen2_5_VisionTransformerPretrainedModel.named_parameters()``.

    Arithmetic on ``vision_config`` (no torch, so ``tools/plan.py`` runs on a login node);
    ``tests/unit/test_planner.py`` checks it against a meta-device build of the tower."""
    v = {**_VISION_DEFAULTS, **(config_json.get("vision_config") or {})}
    h, f, out = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["out_hidden_size"])
    p, merged = int(v["patch_size"]), int(v["hidden_size"]) * int(v["spatial_merge_size"]) ** 2
    shapes = [("patch_embed.proj.weight", (h, int(v["in_channels"]), int(v["temporal_patch_size"]),
                                           p, p))]
    block = [("norm1.weight", (h,)), ("norm2.weight", (h,)), ("attn.qkv.weight", (3 * h, h)),
             ("attn.qkv.bias", (3 * h,)), ("attn.proj.weight", (h, h)), ("attn.proj.bias", (h,)),
             ("mlp.gate_proj.weight", (f, h)), ("mlp.gate_proj.bias", (f,)),
             ("mlp.up_proj.weight", (f, h)), ("mlp.up_proj.bias", (f,)),
             ("mlp.down_proj.weight", (h, f)), ("mlp.down_proj.bias", (h,))]
    shapes += [(f"blocks.{i}.{name}", shape) for i in range(int(v["depth"])) for name, shape in block]
    return shapes + [("merger.ln_q.weight", (h,)), ("merger.mlp.0.weight", (merged, merged)),
                     ("merger.mlp.0.bias", (merged,)), ("merger.mlp.2.weight", (out, merged)),
                     ("merger.mlp.2.bias", (out,))]


def vision_conversion_rules(config_json: Mapping[str, Any], plan: ConversionPlan) -> list[Rule]:
    """Conversion rules for every ``visual.*`` tensor of Qwen2.5-VL: replicated over TP,
    first stage.

    Megatron-side names are ``visual.<HF name without prefix>`` — the names of
    :class:`~sophiavl_mcore.models.qwen2_5_vl.Qwen25VLModel` ``.checkpoint_module()``;
    shapes from :func:`vision_param_shapes`.
    """
    prefix = vision_hf_prefix(plan.hf_prefix)
    return [Rule(f"visual.{name}", (f"{prefix}{name}",), (shape,), "replicated", 0)
            for name, shape in vision_param_shapes(config_json)]


# model_type -> providers; Qwen2.5-VL's tower is built in, so a VL conversion never
# silently drops visual.* tensors.
_EXTRA_RULES: dict[str, list[RuleProvider]] = {"qwen2_5_vl": [vision_conversion_rules]}


def register_extra_rules(model_type: str, provider: RuleProvider) -> None:
    """Register extra tensors for configs whose ``model_type`` matches (e.g. ``visual.*``).

    ``provider(config_json, plan)`` returns rules (usually ``kind="replicated"`` on
    ``stage=0``); it is called once per plan, after the LM rules exist.
    """
    _EXTRA_RULES.setdefault(model_type, [])
    if provider not in _EXTRA_RULES[model_type]:
        _EXTRA_RULES[model_type].append(provider)


def default_hf_prefix(
    config_json: Mapping[str, Any], tensor_names: Iterable[str] | None = None
) -> str:
    """LM prefix of HF tensor names as the checkpoint spells them.

    Hub files and ``save_pretrained`` output use ``model.`` for the LM of Qwen2 *and*
    Qwen2.5-VL (with ``visual.*`` beside it); only transformers-5 in-memory state dicts of
    the VL model use ``model.language_model.``. With ``tensor_names`` (a checkpoint's
    contents) the prefix is read from them; without, the on-disk (hub) layout is assumed.
    """
    if tensor_names is not None and "vision_config" in config_json:
        if any(n.startswith("model.language_model.") for n in tensor_names):
            return "model.language_model."
    return "model."


def build_plan(
    dims: Qwen2Dims,
    tp: int,
    pp: int,
    *,
    layers_per_stage: Sequence[int] | None = None,
    te: bool = False,
    hf_prefix: str = "model.",
    vocab_divisible_by: int = 1,
    config_json: Mapping[str, Any] | None = None,
) -> ConversionPlan:
    """Every rule for a Qwen2 LM at TP=``tp`` × PP=``pp`` (+ registered extra rules)."""
    counts = stage_layer_counts(dims.num_layers, pp, layers_per_stage)
    offsets = stage_layer_offsets(counts)
    h, d = dims.hidden_size, dims.head_dim
    qs, kvs, f = dims.num_heads * d, dims.num_kv_heads * d, dims.ffn_hidden_size
    p = hf_prefix
    rules: list[Rule] = [
        Rule("embedding.word_embeddings.weight", (f"{p}embed_tokens.weight",),
             ((dims.vocab_size, h),), "vocab", 0)
    ]
    in_norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight"
    for stage, (count, offset) in enumerate(zip(counts, offsets, strict=True)):
        for i in range(count):
            g = offset + i
            m, hl = f"decoder.layers.{i}.", f"{p}layers.{g}."
            a = f"{hl}self_attn."
            rules += [
                Rule(m + in_norm, (hl + "input_layernorm.weight",), ((h,),), "replicated", stage),
                Rule(m + "self_attention.linear_qkv.weight",
                     (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                     ((qs, h), (kvs, h), (kvs, h)), "qkv", stage),
                Rule(m + "self_attention.linear_qkv.bias",
                     (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
                     ((qs,), (kvs,), (kvs,)), "qkv", stage),
                Rule(m + "self_attention.linear_proj.weight", (a + "o_proj.weight",),
                     ((h, qs),), "row", stage),
                Rule(m + mlp_norm, (hl + "post_attention_layernorm.weight",), ((h,),),
                     "replicated", stage),
                Rule(m + "mlp.linear_fc1.weight",
                     (hl + "mlp.gate_proj.weight", hl + "mlp.up_proj.weight"),
                     ((f, h), (f, h)), "gate_up", stage),
                Rule(m + "mlp.linear_fc2.weight", (hl + "mlp.down_proj.weight",), ((h, f),),
                     "row", stage),
            ]
    last = pp - 1
    rules.append(Rule("decoder.final_layernorm.weight", (f"{p}norm.weight",), ((h,),),
                      "replicated", last))
    if not dims.tie_word_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), ((dims.vocab_size, h),),
                          "vocab", last))
    elif pp > 1:
        # Megatron keeps a copy of the tied embedding on the last stage for the head.
        rules.append(Rule("output_layer.weight", (f"{p}embed_tokens.weight",),
                          ((dims.vocab_size, h),), "vocab", last, mirror=True))
    plan = ConversionPlan(
        dims=dims, tp=tp, pp=pp, layers_per_stage=counts, te=te, hf_prefix=hf_prefix,
        vocab_padded=padded_vocab_size(dims.vocab_size, tp, vocab_divisible_by), rules=rules,
    )
    if config_json is not None:
        for provider in _EXTRA_RULES.get(str(config_json.get("model_type")), []):
            plan.rules.extend(provider(config_json, plan))
    _check_unique(plan)
    return plan


def _check_unique(plan: ConversionPlan) -> None:
    seen_m: dict[tuple[int, str], Rule] = {}
    seen_hf: dict[str, Rule] = {}
    for r in plan.rules:
        key = (r.stage, r.mcore)
        if key in seen_m:
            raise ValueError(f"two rules produce megatron tensor {r.mcore} on stage {r.stage}")
        seen_m[key] = r
        if r.mirror:
            continue
        for name in r.hf:
            if name in seen_hf:
                raise ValueError(f"HF tensor {name} is claimed by {seen_hf[name].mcore} and {r.mcore}")
            seen_hf[name] = r
