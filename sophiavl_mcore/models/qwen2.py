"""Megatron-Core GPTModel for the Qwen2 / Qwen2.5 language model family.

Qwen2 = pre-RMSNorm decoder, QKV with bias and no other linear bias, SwiGLU MLP, GQA,
RoPE (theta from config), optionally tied input/output embeddings. Qwen2.5-VL's LM is
the same network with 3-section multimodal RoPE (``position_embedding_type="mrope"``,
position ids [3, b, s]) and image embeddings fed as ``decoder_input`` [s, b, h].

Forward (Megatron convention)::

    logits = model(input_ids [b, s], position_ids [b, s] or [3, b, s], attention_mask=None,
                   decoder_input=None or [s, b, h])  ->  [b, s, vocab_padded / tp]

``attention_mask=None`` means causal. Logits are vocab-parallel (``parallel_output``);
columns ``>= model.hf_vocab_size`` (after gathering) are padding and must be dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from sophiavl_mcore.models.hf_config import (
    Qwen2Dims,
    make_transformer_config,
    padded_vocab_size,
    read_lm_dims,
)
from sophiavl_mcore.models.specs import layer_spec, te_available
from sophiavl_mcore.parallel.config import ParallelConfig
from sophiavl_mcore.parallel.init import ParallelInfo

logger = logging.getLogger(__name__)


def _as_parallel_config(parallel: ParallelInfo | ParallelConfig | None) -> ParallelConfig:
    if parallel is None:
        from megatron.core import parallel_state

        return ParallelConfig(
            tp=parallel_state.get_tensor_model_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_world_size(),
        )
    if isinstance(parallel, ParallelConfig):
        return parallel
    return ParallelConfig(
        tp=parallel.tp,
        pp=parallel.pp,
        sequence_parallel=parallel.sequence_parallel,
        layers_per_stage=list(parallel.layers_per_stage)
        if parallel.layers_per_stage and len(set(parallel.layers_per_stage)) > 1
        else None,
        seed=parallel.seed,
    )


def build_qwen2_lm(
    hf_config: Mapping[str, Any] | str | Path | Qwen2Dims,
    parallel: ParallelInfo | ParallelConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    use_te: bool | None = None,
    fp8: Literal["e4m3", "hybrid"] | None = None,
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] | None = None,
    position_embedding_type: Literal["rope", "mrope"] = "rope",
    mrope_section: Sequence[int] | None = None,
    vocab_divisible_by: int = 1,
    parallel_output: bool = True,
    perform_initialization: bool = True,
    pg_collection: Any = None,
    **config_overrides: Any,
):
    """Build this rank's GPTModel for a Qwen2/Qwen2.5 LM described by an HF config.

    Args:
        hf_config: config.json path/dir, parsed dict, or :class:`Qwen2Dims`.
        parallel: the layout (``ParallelInfo`` from ``initialize_parallel``, or a
            ``ParallelConfig``); ``None`` reads the sizes from Megatron parallel_state.
        dtype: parameter dtype.
        pre_process / post_process: embedding / output head on this rank; default from
            the pipeline stage in parallel_state.
        use_te: Transformer Engine spec (default: when CUDA + TE exist). FP8 requires it.
        fp8, fp8_recipe: FP8 format and recipe (validated even on CPU).
        position_embedding_type: ``rope`` (text LM) or ``mrope`` (Qwen2.5-VL LM).
        mrope_section: (t, h, w) rotary split; default from the config's rope_scaling.
        vocab_divisible_by: pad vocab to a multiple of this × tp (see padded_vocab_size).
        parallel_output: keep logits vocab-parallel (True for vocab-parallel losses).
        perform_initialization: False skips random init (meta builds, loading weights).
        pg_collection: Megatron ``ProcessGroupCollection`` (default: parallel_state's).
        config_overrides: extra TransformerConfig fields (e.g. recompute settings).

    Returns:
        ``megatron.core.models.gpt.GPTModel`` with attributes ``hf_dims`` and
        ``hf_vocab_size`` (unpadded vocab).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    dims = hf_config if isinstance(hf_config, Qwen2Dims) else read_lm_dims(hf_config)
    pcfg = _as_parallel_config(parallel)
    if use_te is None:
        use_te = te_available()
    if use_te and not te_available():
        raise RuntimeError("use_te=True but CUDA/Transformer Engine are not available")
    if fp8 is not None and not use_te:
        # Validate first so that a bad recipe is reported even on CPU.
        make_transformer_config(dims, pcfg, dtype=dtype, fp8=fp8, fp8_recipe=fp8_recipe, cpu=True)
        raise RuntimeError(f"fp8={fp8!r} needs the Transformer Engine spec (CUDA + TE)")
    config = make_transformer_config(
        dims,
        pcfg,
        dtype=dtype,
        fp8=fp8,
        fp8_recipe=fp8_recipe,
        mrope_section=mrope_section,
        use_mrope=position_embedding_type == "mrope",
        perform_initialization=perform_initialization,
        **config_overrides,
    )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    vocab = padded_vocab_size(dims.vocab_size, pcfg.tp, vocab_divisible_by)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(use_te),
        vocab_size=vocab,
        max_sequence_length=dims.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=dims.tie_word_embeddings,
        position_embedding_type=position_embedding_type,
        rotary_percent=1.0,
        rotary_base=dims.rope_theta,
        pg_collection=pg_collection,
    )
    model.hf_dims = dims
    model.hf_vocab_size = dims.vocab_size
    return model
