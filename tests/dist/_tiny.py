"""Tiny random Qwen2.5 checkpoints written with transformers (stand-ins for hub models)."""

from __future__ import annotations

from pathlib import Path

VOCAB = 500  # padded to 512 with vocab_divisible_by=128 (exercises vocab padding)
PAD_DIVISOR = 128


def tiny_config(tied: bool = False):
    from transformers import Qwen2Config

    # head_dim 64 with hidden 128: q width (256) != hidden, GQA 4 heads / 2 groups.
    return Qwen2Config(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, intermediate_size=256, vocab_size=VOCAB, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=tied, max_position_embeddings=256,
        initializer_range=0.05,
    )


def write_tiny_qwen2(path: Path, tied: bool = False, seed: int = 0, shard: bool = False) -> Path:
    """Random-weight Qwen2ForCausalLM saved as safetensors (sharded when ``shard``)."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(tied))
    with torch.no_grad():  # HF inits biases to zero; random biases test the qkv map
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, max_shard_size="300KB" if shard else "2GB")
    return path
