"""Tiny random-weight Qwen2.5 / Qwen2.5-VL checkpoints written to disk.

Nothing can be downloaded in CI, so tests and benchmarks build stand-ins for the hub
checkpoints: a byte-level BPE tokenizer trained on a few sentences (so every string
encodes), the Qwen chat special tokens, a Qwen-style chat template that understands
image content parts, and a model whose shapes follow the real family at toy scale.

head_dim is 64 everywhere because vLLM's CPU attention rejects smaller heads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sophiavl_mcore.models.tiny_spec import SPECIAL_TOKENS, TinyModelSpec

__all__ = ["SPECIAL_TOKENS", "TinyModelSpec", "build_tiny_qwen2_5_vl", "build_tokenizer"]

logger = logging.getLogger(__name__)

# A Qwen-style ChatML template: strings or lists of {"type": "text"|"image"|"image_url"}.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{%- endif -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') or 'image' in part -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

_CORPUS = (
    "<think>Let me reason step by step about the image and the question.</think>",
    "<answer>0.0</answer> <answer>0.5</answer> <answer>1.0</answer> 0.1 0.2 0.3 0.4 0.6 0.7 0.8 0.9",
    "The answer is 42. The area of the triangle is 12 square units. Option A, B, C or D.",
    "Evaluate the reasoning: logical soundness, correct reasoning, error identification, "
    "language consistency, redundancy. Give a score between 0 and 1.",
    "Question: what is shown in the picture? Reasoning: the picture shows a red square.",
)


def build_tokenizer(out_dir: str | Path, spec: TinyModelSpec | None = None):
    """Train a byte-level BPE tokenizer with Qwen's special tokens and save it.

    Returns the transformers tokenizer (also written to ``out_dir``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = spec or TinyModelSpec()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.bpe_vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def _token_ids(tok) -> dict[str, int]:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None or i < 0]
    if missing:
        raise RuntimeError(f"tokenizer lacks special tokens {missing}")
    return ids


def _text_config_kwargs(spec: TinyModelSpec, ids: dict[str, int]) -> dict:
    return dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def _write_generation_config(out_dir: Path, ids: dict[str, int]) -> None:
    # vLLM reads stop tokens from here; both ChatML and document ends stop generation.
    gen = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"]}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))


def build_tiny_qwen2_5_vl(out_dir: str | Path, spec: TinyModelSpec | None = None,
                          max_pixels: int = 28 * 28 * 16) -> Path:
    """Write a tiny random Qwen2.5-VL + tokenizer + processor config; return the dir.

    ``max_pixels`` bounds the image size after smart-resize (default 16 merged image
    tokens per image), which keeps prompts short on CPU.
    """
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, spec)
    ids = _token_ids(tok)
    head_dim = spec.hidden_size // spec.num_heads
    # M-RoPE splits head_dim/2 rotary frequencies into (temporal, height, width).
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text = _text_config_kwargs(spec, ids)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6,
                               "mrope_section": section}
    vision = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden_size,
        intermediate_size=2 * spec.vision_hidden_size,
        num_heads=spec.vision_heads,
        out_hidden_size=spec.hidden_size,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[spec.vision_depth - 1],
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    image_processor = Qwen2VLImageProcessor(
        min_pixels=28 * 28 * 4, max_pixels=max_pixels, patch_size=14,
        temporal_patch_size=2, merge_size=2,
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=28 * 28 * 4, max_pixels=max_pixels, patch_size=14,
        temporal_patch_size=2, merge_size=2,
    )
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                    video_processor=video_processor,
                                    chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(str(out))
    _write_generation_config(out, ids)
    return out


def make_test_image(seed: int = 0, size: tuple[int, int] = (56, 84)):
    """A deterministic RGB PIL image (height, width) = ``size`` of random pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
    return Image.fromarray(arr, mode="RGB")
