"""Megatron-Core model builders (Qwen2/2.5 LM here; Qwen2.5-VL builds on it).

Public API::

    build_qwen2_lm(hf_config, parallel, *, dtype, pre_process, post_process, use_te, fp8,
                   fp8_recipe, position_embedding_type, mrope_section, ...) -> GPTModel
    read_lm_dims(config) -> Qwen2Dims ; make_transformer_config(dims, parallel_cfg, ...)
    layer_spec(use_te) ; local_layer_spec() ; te_layer_spec()
"""

from sophiavl_mcore.models.hf_config import (
    HFConfigError,
    Qwen2Dims,
    make_transformer_config,
    padded_vocab_size,
    read_lm_dims,
)
from sophiavl_mcore.models.qwen2 import build_qwen2_lm
from sophiavl_mcore.models.specs import layer_spec, local_layer_spec, te_available, te_layer_spec

__all__ = [
    "HFConfigError",
    "Qwen2Dims",
    "build_qwen2_lm",
    "layer_spec",
    "local_layer_spec",
    "make_transformer_config",
    "padded_vocab_size",
    "read_lm_dims",
    "te_available",
    "te_layer_spec",
]
