"""Megatron-Core model builders (Qwen2/2.5 LM here; Qwen2.5-VL builds on it).

Public API::

    build_qwen2_lm(hf_config, parallel, *, dtype, pre_process, post_process, use_te, fp8,
                   fp8_recipe, position_embedding_type, mrope_section, ...) -> GPTModel
    read_lm_dims(config) -> Qwen2Dims ; make_transformer_config(dims, parallel_cfg, ...)
    layer_spec(use_te) ; local_layer_spec() ; te_layer_spec()
"""

from sophiavl_mcore.lazy import lazy_attributes

# Imported on first use, so that the shape arithmetic (hf_config.read_lm_dims, used by
# tools/plan.py) does not import torch and Megatron through this package.
_EXPORTS = {
    "HFConfigError": "sophiavl_mcore.models.hf_config",
    "Qwen2Dims": "sophiavl_mcore.models.hf_config",
    "make_transformer_config": "sophiavl_mcore.models.hf_config",
    "padded_vocab_size": "sophiavl_mcore.models.hf_config",
    "read_lm_dims": "sophiavl_mcore.models.hf_config",
    "build_qwen2_lm": "sophiavl_mcore.models.qwen2",
    "layer_spec": "sophiavl_mcore.models.specs",
    "local_layer_spec": "sophiavl_mcore.models.specs",
    "te_available": "sophiavl_mcore.models.specs",
    "te_layer_spec": "sophiavl_mcore.models.specs",
}
__getattr__ = lazy_attributes(__name__, _EXPORTS)

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
