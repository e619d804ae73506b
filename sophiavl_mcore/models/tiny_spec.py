"""The shapes of the tiny stand-in checkpoints (``model.tiny`` recipes, tests, benches).

Plain numbers, so that a dry run and the layout checks know a tiny policy's dimensions
without building it; :mod:`sophiavl_mcore.testing.tiny_models` writes the checkpoint.
"""

from __future__ import annotations

import dataclasses

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

@dataclasses.dataclass
class TinyModelSpec:
    """Shapes of a tiny checkpoint (defaults give ~1-2 M parameters)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2  # head_dim = hidden_size / num_heads = 64
    num_kv_heads: int = 1
    intermediate_size: int = 256
    vocab_size: int = 768  # >= tokenizer size; padded like the real models
    bpe_vocab: int = 600
    max_position_embeddings: int = 4096
    vision_depth: int = 2
    vision_hidden_size: int = 128
    vision_heads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads < 64:
            raise ValueError(
                f"hidden_size={self.hidden_size} / num_heads={self.num_heads} must divide "
                "and give head_dim >= 64 (vLLM CPU attention rejects smaller heads)"
            )
        if self.bpe_vocab + len(SPECIAL_TOKENS) > self.vocab_size:
            raise ValueError(
                f"bpe_vocab={self.bpe_vocab} + {len(SPECIAL_TOKENS)} special tokens exceeds "
                f"vocab_size={self.vocab_size}"
            )
