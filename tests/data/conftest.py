"""Fixtures for the data/ tests: a tiny Qwen2-VL-style tokenizer, image files."""

from __future__ import annotations

from pathlib import Path

import pytest

from sophiavl_mcore.data.synthetic import write_png_rows

# Qwen2-VL's chat template, written out for these tests: each image item becomes
# <|vision_start|><|image_pad|><|vision_end|>, as the released tokenizer_config does.
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level PreTrainedTokenizerFast with Qwen2-VL's special tokens and template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a what is of in image answer think options color shape number text".split()
    vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    fast.chat_template = QWEN2_VL_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def huge_png(tmp_path_factory) -> Path:
    """A 20000×20000 RGB PNG (~1 MB on disk), written row by row: never 1.2 GB in memory."""
    path = tmp_path_factory.mktemp("huge") / "huge_20000.png"
    write_png_rows(path, 20000, 20000, channels=3)
    return path
