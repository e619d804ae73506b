"""config.json → Qwen2Dims → TransformerConfig, checked against transformers' own configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sophiavl_mcore.models.hf_config import (
    HFConfigError,
    check_fp8,
    make_transformer_config,
    padded_vocab_size,
    read_lm_dims,
)
from sophiavl_mcore.parallel import LayoutError, ParallelConfig

CONFIGS = Path(__file__).resolve().parents[2] / "tools" / "configs"


def test_72b_configs_read_like_transformers():
    import transformers

    for name in ("qwen2_5_72b_instruct.json", "qwen2_5_vl_72b_instruct.json"):
        raw = json.loads((CONFIGS / name).read_text())
        dims = read_lm_dims(CONFIGS / name)
        if raw["model_type"] == "qwen2":
            ref = transformers.Qwen2Config(**raw)
        else:
            ref = transformers.Qwen2_5_VLConfig(**raw).text_config
            assert dims.mrope_section == (16, 24, 24) and dims.is_vl
        assert (dims.hidden_size, dims.num_layers, dims.num_heads, dims.num_kv_heads) == (
            ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads)
        assert (dims.ffn_hidden_size, dims.vocab_size, dims.rms_norm_eps) == (
            ref.intermediate_size, ref.vocab_size, ref.rms_norm_eps)
        assert dims.head_dim == 128 and dims.rope_theta == 1e6 and not dims.tie_word_embeddings


def test_transformers5_text_config_layout(tmp_path):
    import transformers

    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=512, vocab_size=1000,
                         rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}),
        vision_config=dict(depth=1, hidden_size=64, out_hidden_size=256))
    cfg.save_pretrained(tmp_path)
    dims = read_lm_dims(tmp_path)
    assert (dims.hidden_size, dims.num_layers, dims.vocab_size) == (256, 2, 1000)
    assert dims.mrope_section == (8, 12, 12)


def test_transformer_config_fields_and_validation():
    dims = read_lm_dims(CONFIGS / "qwen2_5_72b_instruct.json")
    tc = make_transformer_config(dims, ParallelConfig(tp=8, pp=2), dtype=torch.bfloat16, cpu=True)
    assert tc.add_qkv_bias and not tc.add_bias_linear and tc.gated_linear_unit
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-6
    assert tc.num_query_groups == 8 and tc.kv_channels == 128 and tc.bf16
    uneven = make_transformer_config(dims, ParallelConfig(pp=2, layers_per_stage=[39, 41]), cpu=True)
    assert uneven.pipeline_model_parallel_layout is not None
    with pytest.raises(LayoutError, match="tp=16"):
        make_transformer_config(dims, ParallelConfig(tp=16), cpu=True)
    with pytest.raises(HFConfigError, match="head_dim/2=64"):
        make_transformer_config(dims, ParallelConfig(), cpu=True, mrope_section=[16, 16, 16],
                                use_mrope=True)


def test_fp8_options_validated_on_cpu():
    check_fp8("e4m3", "tensorwise")
    check_fp8("hybrid", "blockwise")
    with pytest.raises(HFConfigError, match="fp8='e5m2'"):
        check_fp8("e5m2", "delayed")
    with pytest.raises(HFConfigError, match="fp8_recipe='weird'"):
        check_fp8("e4m3", "weird")
    with pytest.raises(HFConfigError, match="without fp8"):
        check_fp8(None, "delayed")


def test_bad_config_fields_named(tmp_path):
    with pytest.raises(HFConfigError, match="does not exist"):
        read_lm_dims(tmp_path)
    raw = json.loads((CONFIGS / "qwen2_5_72b_instruct.json").read_text())
    del raw["intermediate_size"]
    with pytest.raises(HFConfigError, match="'intermediate_size' is missing"):
        read_lm_dims(raw)
    raw = json.loads((CONFIGS / "qwen2_5_72b_instruct.json").read_text()) | {"model_type": "llama"}
    with pytest.raises(HFConfigError, match="model_type='llama'"):
        read_lm_dims(raw)


def test_vocab_padding():
    assert padded_vocab_size(152064, 8) == 152064
    assert padded_vocab_size(500, 2, 128) == 512
    assert padded_vocab_size(151665, 8, 128) == 152576
