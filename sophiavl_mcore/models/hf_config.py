"""Hugging Face ``config.json`` (Qwen2 / Qwen2.5 / Qwen2.5-VL LM) → Megatron TransformerConfig.

Two steps so that shape arithmetic (conversion maps, the 72B meta proof, ``tools/plan``)
never needs Megatron: :func:`read_lm_dims` turns the JSON into :class:`Qwen2Dims` (pure
data, validated), :func:`make_transformer_config` turns dims + layout into a
``TransformerConfig``.

Qwen2.5-VL ``config.json`` files come in two shapes: the published hub files keep the LM
fields at top level beside ``vision_config``; transformers 5 writes them under
``text_config``. Both are read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sophiavl_mcore.parallel.config import LayoutError, ParallelConfig
from sophiavl_mcore.parallel.layout import stage_layer_counts

if TYPE_CHECKING:
    import torch

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_5_vl", "qwen2_vl", "qwen2_5_vl_text", "qwen2_vl_text")


class HFConfigError(ValueError):
    """A config.json that cannot describe a supported Qwen2 LM (names file and field)."""


@dataclasses.dataclass(frozen=True)
class Qwen2Dims:
    """LM dimensions read from config.json (units: elements; lengths in tokens)."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    initializer_range: float
    mrope_section: tuple[int, ...] | None
    is_vl: bool

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def hf_num_params(self) -> int:
        """Parameter count of the HF LM (no vision tower), from shape arithmetic only."""
        h, f = self.hidden_size, self.ffn_hidden_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size + 2 * self.kv_size
        attn += self.q_size * h
        mlp = 3 * h * f
        layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + emb + head + h


def load_config_json(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Read a config.json (a file, a checkpoint directory, or an already-parsed dict)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise HFConfigError(f"config file {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFConfigError(f"{path}: not valid JSON ({err})") from err


def _text_section(cfg: Mapping[str, Any]) -> dict[str, Any]:
    text = cfg.get("text_config")
    if isinstance(text, Mapping):
        merged = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
        merged.update(text)
        merged["model_type"] = cfg.get("model_type", text.get("model_type"))
        return merged
    return dict(cfg)


def read_lm_dims(source: str | Path | Mapping[str, Any]) -> Qwen2Dims:
    """Validated LM dimensions of a Qwen2 / Qwen2.5 / Qwen2.5-VL config.json."""
    raw = load_config_json(source)
    where = str(source) if not isinstance(source, Mapping) else "config"
    cfg = _text_section(raw)
    model_type = str(cfg.get("model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFConfigError(
            f"{where}: model_type={model_type!r} is not supported; expected one of "
            f"{SUPPORTED_MODEL_TYPES}"
        )

    def need(key: str, kind: type) -> Any:
        if key not in cfg:
            raise HFConfigError(f"{where}: field {key!r} is missing")
        value = cfg[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise HFConfigError(f"{where}: field {key!r}={value!r} should be {kind.__name__}")
        return value

    hidden = need("hidden_size", int)
    heads = need("num_attention_heads", int)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or 0) or hidden // heads
    if head_dim * heads != hidden and "head_dim" not in cfg:
        raise HFConfigError(
            f"{where}: hidden_size={hidden} is not divisible by num_attention_heads={heads}"
        )
    if heads % kv_heads != 0:
        raise HFConfigError(
            f"{where}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}"
        )
    rope_scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    mrope = rope_scaling.get("mrope_section") if isinstance(rope_scaling, Mapping) else None
    rope_theta = cfg.get("rope_theta")
    if rope_theta is None and isinstance(rope_scaling, Mapping):
        rope_theta = rope_scaling.get("rope_theta")
    if rope_theta is None:
        raise HFConfigError(f"{where}: field 'rope_theta' is missing")
    if cfg.get("hidden_act", "silu") != "silu":
        raise HFConfigError(f"{where}: hidden_act={cfg.get('hidden_act')!r}, expected 'silu'")
    return Qwen2Dims(
        model_type=model_type,
        hidden_size=hidden,
        num_layers=need("num_hidden_layers", int),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=need("intermediate_size", int),
        vocab_size=need("vocab_size", int),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        mrope_section=tuple(int(x) for x in mrope) if mrope else None,
        is_vl="vision_config" in raw,
    )


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 1) -> int:
    """Vocab rounded up to a multiple of ``divisible_by * tp`` (Megatron's padding rule).

    The default (1) pads only when TP needs it, so a 152064-token vocab stays exact at
    TP=8; padded rows are zero in converted checkpoints and dropped on export, and
    consumers slice logits to ``[..., :vocab_size]``.
    """
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


FP8Format = Literal["e4m3", "hybrid"]
FP8Recipe = Literal["delayed", "tensorwise", "blockwise", "mxfp8"]


def check_fp8(fp8: str | None, fp8_recipe: str | None) -> None:
    """Validate FP8 options (runs on CPU too, so bad recipes fail before a GPU job)."""
    if fp8 is None:
        if fp8_recipe is not None:
            raise HFConfigError(f"fp8_recipe={fp8_recipe!r} given without fp8 (e4m3|hybrid)")
        return
    if fp8 not in ("e4m3", "hybrid"):
        raise HFConfigError(f"fp8={fp8!r}: expected 'e4m3' or 'hybrid'")
    if fp8_recipe not in (None, "delayed", "tensorwise", "blockwise", "mxfp8"):
        raise HFConfigError(
            f"fp8_recipe={fp8_recipe!r}: expected delayed, tensorwise, blockwise or mxfp8"
        )


def _stage_kwargs(num_layers: int, pp: int, layers_per_stage: Sequence[int] | None) -> dict:
    """TransformerConfig fields for an uneven pipeline split (empty when even)."""
    counts = stage_layer_counts(num_layers, pp, layers_per_stage)
    if len(set(counts)) == 1:
        return {}
    # Megatron's layout string: E = embedding, t = decoder layer, L = loss, | = stage cut.
    stages = ["t" * c for c in counts]
    stages[0] = "E" + stages[0]
    stages[-1] = stages[-1] + "L"
    return {"pipeline_model_parallel_layout": "|".join(stages)}


def make_transformer_config(
    dims: Qwen2Dims,
    parallel: ParallelConfig,
    *,
    dtype: torch.dtype | None = None,
    cpu: bool | None = None,
    fp8: str | None = None,
    fp8_recipe: str | None = None,
    mrope_section: Sequence[int] | None = None,
    use_mrope: bool = False,
    perform_initialization: bool = True,
    **overrides: Any,
):
    """A Megatron ``TransformerConfig`` for the Qwen2 LM described by ``dims``.

    Args:
        dims: from :func:`read_lm_dims`.
        parallel: layout (tp, pp, sequence_parallel, layers_per_stage).
        dtype: parameter dtype (float32 — the default —, bfloat16, float16).
        cpu: CPU mode (params initialised on CPU, fused kernels off); default: no CUDA.
        fp8, fp8_recipe: FP8 training options (validated here, used by the TE spec).
        mrope_section: (t, h, w) rotary split for multimodal RoPE; defaults to the
            config's ``rope_scaling.mrope_section``.
        use_mrope: set ``mrope_section`` on the config (Qwen2.5-VL LM).
        overrides: any further TransformerConfig field.
    """
    import torch  # here, so that the shape arithmetic above imports without torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.float32 if dtype is None else dtype
    check_fp8(fp8, fp8_recipe)
    if cpu is None:
        cpu = not torch.cuda.is_available()
    if dims.num_heads % parallel.tp or dims.num_kv_heads % parallel.tp:
        raise LayoutError(
            f"num_attention_heads={dims.num_heads} and num_key_value_heads={dims.num_kv_heads} "
            f"must both be divisible by tp={parallel.tp}"
        )
    kwargs: dict[str, Any] = dict(
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        num_attention_heads=dims.num_heads,
        num_query_groups=dims.num_kv_heads,
        kv_channels=dims.head_dim,
        ffn_hidden_size=dims.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=dims.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=dims.initializer_range,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=cpu,
        perform_initialization=perform_initialization,
        bias_activation_fusion=not cpu,
        bias_dropout_fusion=not cpu,
        masked_softmax_fusion=not cpu,
        persist_layer_norm=not cpu,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
    )
    section = mrope_section if mrope_section is not None else dims.mrope_section
    if use_mrope and section is None:
        raise HFConfigError("multimodal RoPE needs mrope_section (t, h, w); the config has none")
    if use_mrope:
        if 2 * sum(section) != dims.head_dim:
            raise HFConfigError(
                f"mrope_section={list(section)} sums to {sum(section)}, expected "
                f"head_dim/2={dims.head_dim // 2}"
            )
        kwargs["mrope_section"] = list(section)
    if fp8 is not None:
        kwargs.update(fp8=fp8, fp8_recipe=fp8_recipe or "delayed")
    kwargs.update(_stage_kwargs(dims.num_layers, parallel.pp, parallel.layers_per_stage))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
