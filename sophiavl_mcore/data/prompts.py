"""Prompt construction for SophiaVL-R1 records.

A prompt is a chat: a system message that asks for the reasoning inside
``<think></think>`` and the final answer inside ``<answer></answer>``, then one user
message holding the image (if any) and the question text, built as::

    question_template.format(question=<problem + listed options>) + type_instructions[type]

The chat template is the model's own (tokenizer or processor ``apply_chat_template``),
so the image appears as Qwen2.5-VL's ``<|vision_start|><|image_pad|><|vision_end|>``.
vLLM expands the single ``<|image_pad|>`` itself; the Megatron policy needs it repeated
once per merged patch, which :func:`expand_image_tokens` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sophiavl_mcore.data.config import PromptConfig
from sophiavl_mcore.data.records import Record

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

def _has_letter_prefix(option: str) -> bool:
    """True if the option text already starts with its letter, as in 'A. cat' or '(B) dog'."""
    text = option.lstrip()
    if text.startswith("(") and len(text) >= 3 and text[2] == ")":
        return text[1].isalpha()
    return len(text) >= 2 and text[0].isalpha() and text[0].isupper() and text[1] in ".):"


def question_text(record: Record, cfg: PromptConfig) -> str:
    """The user text: problem, options (multiple choice), template and type instruction."""
    question = record.problem.strip()
    if record.problem_type == "multiple choice" and record.options:
        if len(record.options) > len(cfg.option_letters):
            raise ValueError(
                f"record {record.problem_id}: {len(record.options)} options but only "
                f"{len(cfg.option_letters)} option letters"
            )
        lines = [
            opt.strip() if _has_letter_prefix(opt) else f"{cfg.option_letters[i]}. {opt.strip()}"
            for i, opt in enumerate(record.options)
        ]
        question = question + "\nOptions:\n" + "\n".join(lines)
    return cfg.question_template.format(question=question) + cfg.type_instructions[record.problem_type]


def build_messages(record: Record, cfg: PromptConfig) -> list[dict[str, Any]]:
    """Chat messages in the transformers multimodal format (image first, then text)."""
    content: list[dict[str, Any]] = []
    if record.has_image:
        content.append({"type": "image"})
    content.append({"type": "text", "text": question_text(record, cfg)})
    messages: list[dict[str, Any]] = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": content})
    return messages


def build_prompt(record: Record, chat: Any, cfg: PromptConfig | None = None) -> str:
    """Prompt text after the model's chat template, ending with the assistant turn opener.

    ``chat`` is a tokenizer or a processor with ``apply_chat_template`` (a Qwen2.5-VL
    processor/tokenizer puts ``<|vision_start|><|image_pad|><|vision_end|>`` where the
    image goes).
    """
    cfg = cfg or PromptConfig()
    text = chat.apply_chat_template(
        build_messages(record, cfg), tokenize=False, add_generation_prompt=True
    )
    if record.has_image and text.count(IMAGE_PAD) != 1:
        raise ValueError(
            f"record {record.problem_id}: the chat template produced {text.count(IMAGE_PAD)} "
            f"{IMAGE_PAD} tokens for one image; is it a Qwen2-VL-style template?"
        )
    return text


def expand_image_tokens(text: str, grid_thw: Sequence[Sequence[int]], merge_size: int = 2) -> str:
    """Repeat each ``<|image_pad|>`` ``t·h·w / merge_size²`` times (the policy's input form).

    ``grid_thw``: one ``(t, h, w)`` in patches per image, in order of appearance.
    """
    parts = text.split(IMAGE_PAD)
    if len(parts) - 1 != len(grid_thw):
        raise ValueError(f"{len(parts) - 1} {IMAGE_PAD} tokens in the text but {len(grid_thw)} images")
    out = [parts[0]]
    for (t, h, w), rest in zip(grid_thw, parts[1:], strict=True):
        out.append(IMAGE_PAD * (int(t) * int(h) * int(w) // (merge_size * merge_size)))
        out.append(rest)
    return "".join(out)
