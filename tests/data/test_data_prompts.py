"""Prompt construction with a real (tiny) tokenizer carrying a Qwen2-VL chat template."""

from __future__ import annotations

import re

import pytest

from sophiavl_mcore.data.config import PromptConfig
from sophiavl_mcore.data.prompts import (
    build_messages,
    build_prompt,
    expand_image_tokens,
    question_text,
)
from sophiavl_mcore.data.records import Record


def record(**over) -> Record:
    fields = dict(
        problem_id="7", problem="What color is the shape?", data_type="image",
        problem_type="multiple choice", options=("red", "blue", "green"),
        solution="<answer>B</answer>", answer="B", image_path="/x/7.jpg", data_source="t",
    )
    fields.update(over)
    return Record(**fields)


def test_multiple_choice_image_prompt(tiny_tokenizer):
    text = build_prompt(record(), tiny_tokenizer)
    cfg = PromptConfig()
    assert text.startswith("<|im_start|>system\n" + cfg.system_prompt + "<|im_end|>\n")
    user = text.split("<|im_start|>user\n", 1)[1]
    assert user.startswith("<|vision_start|><|image_pad|><|vision_end|>What color is the shape?")
    assert "Options:\nA. red\nB. blue\nC. green" in user
    assert cfg.type_instructions["multiple choice"] in user
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "<think>" in cfg.system_prompt and "<answer>" in cfg.system_prompt
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    pad = tiny_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(pad) == 1  # one special token, not split into pieces


def test_text_only_and_per_type_instructions(tiny_tokenizer):
    cfg = PromptConfig()
    for ptype in ("numerical", "OCR", "free-form"):
        rec = record(problem_type=ptype, options=(), data_type="text", image_path=None)
        text = build_prompt(rec, tiny_tokenizer, cfg)
        assert "<|vision_start|>" not in text and "Options:" not in text
        assert cfg.type_instructions[ptype] in text
        others = [v for k, v in cfg.type_instructions.items() if k != ptype]
        assert not any(o in text for o in others)


def test_lettered_options_are_not_lettered_twice():
    cfg = PromptConfig()
    q = question_text(record(options=("A. red", "(B) blue", "C: green")), cfg)
    assert "A. red\n(B) blue\nC: green" in q and "A. A." not in q
    q2 = question_text(record(options=("Apple pie", "banana")), cfg)
    assert "A. Apple pie\nB. banana" in q2


def test_messages_structure_and_custom_config():
    cfg = PromptConfig(system_prompt="", question_template="Q: {question}")
    msgs = build_messages(record(problem_type="numerical", options=()), cfg)
    assert [m["role"] for m in msgs] == ["user"]
    assert msgs[0]["content"][0] == {"type": "image"}
    assert msgs[0]["content"][1]["text"].startswith("Q: What color is the shape?")
    with pytest.raises(ValueError, match=r"must contain '\{question\}'"):
        PromptConfig(question_template="no slot")
    with pytest.raises(ValueError, match=r"unknown \['essay'\]"):
        PromptConfig(type_instructions={**PromptConfig().type_instructions, "essay": "x"})


def test_expand_image_tokens():
    text = "<|vision_start|><|image_pad|><|vision_end|>hi"
    out = expand_image_tokens(text, [(1, 4, 6)], merge_size=2)
    assert out.count("<|image_pad|>") == 6 and out.endswith("<|vision_end|>hi")
    two = expand_image_tokens("<|image_pad|>x<|image_pad|>", [(1, 2, 2), (1, 4, 4)])
    assert two == "<|image_pad|>x" + "<|image_pad|>" * 4
    with pytest.raises(ValueError, match=re.escape("1 <|image_pad|> tokens in the text but 2 images")):
        expand_image_tokens(text, [(1, 2, 2), (1, 2, 2)])


def test_template_without_image_token_is_refused():
    class Plain:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "".join(c["text"] for c in messages[-1]["content"] if c["type"] == "text")

    with pytest.raises(ValueError, match=re.escape("produced 0 <|image_pad|> tokens for one image")):
        build_prompt(record(), Plain())
