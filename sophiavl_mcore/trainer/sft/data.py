"""Records → tokenised SFT examples (:class:`~sophiavl_mcore.trainer.collate.SFTExample`).

Two kinds of examples share one builder:

* **TRM** (SophiaVL-R1-Thinking records: question, image, reasoning, target score): the
  prompt is *exactly* the one the TRM client sends at inference —
  :func:`sophiavl_mcore.rewards.thinking.build_messages` rendered with the model's chat
  template — and the target is ``<answer>s</answer>`` + end-of-turn, s with one decimal
  (the grammar the client's constrained decoding allows).
* **policy warm start** (SophiaVL-R1 records): the GRPO prompt of
  :func:`sophiavl_mcore.data.prompts.build_prompt` and the target
  ``<think>reasoning</think><answer>answer</answer>`` + end-of-turn.

Thinking record schema (one JSON object per record; .json / .jsonl / .parquet)::

    problem_id  int | str   optional (default: the record's index), unique in the file
    problem     str         the question  (alias: question)
    path        str         image path relative to the image root; optional (alias: image)
    reasoning   str         the reasoning to grade, non-empty  (alias: response)
    score       number      target score in [0, 1]; rounded to one decimal

Schema problems raise :class:`~sophiavl_mcore.data.records.RecordError` at load time,
naming file, record and field. Images are checked when loaded (the data package's
:class:`~sophiavl_mcore.data.images.ImageLoader`): a bad image drops its example and is
counted per reason (``data/skipped_<reason>``), as in GRPO training. Examples longer
than ``max_seq_len`` are dropped and counted (``data/skipped_too_long``).

Prompt and target are tokenised separately and concatenated, so the boundary between
masked and trained tokens is exact and the prompt tokens are those vLLM sees at serving.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sophiavl_mcore.data.config import ImageConfig, PromptConfig
from sophiavl_mcore.data.images import ImageLoader
from sophiavl_mcore.data.prompts import IMAGE_PAD, build_prompt, expand_image_tokens
from sophiavl_mcore.data.records import Record, RecordError, read_raw_records
from sophiavl_mcore.rewards.config import ThinkingRewardConfig
from sophiavl_mcore.rewards.thinking import ThinkingRequest, build_messages
from sophiavl_mcore.trainer.collate import SFTExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_ALIASES = {"problem": ("problem", "question"), "path": ("path", "image"),
            "reasoning": ("reasoning", "response")}


# ------------------------------------------------------------------ thinking records


@dataclasses.dataclass(frozen=True)
class ThinkingRecord:
    """One validated TRM training record; ``image_path`` absolute or None."""

    problem_id: str
    problem: str
    reasoning: str
    score: float
    image_path: str | None
    where: str


def _field(rec: Mapping[str, Any], name: str) -> tuple[str, Any]:
    for key in _ALIASES.get(name, (name,)):
        if key in rec and rec[key] is not None:
            return key, rec[key]
    return name, None


def validate_thinking_record(rec: Any, where: str, image_root: Path, index: int) -> ThinkingRecord:
    """Check one raw record (see the module docstring) and return it validated."""
    if not isinstance(rec, Mapping):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    pid = rec.get("problem_id", index)
    if isinstance(pid, bool) or not isinstance(pid, (int, str)):
        raise RecordError(f"{where}: field 'problem_id' must be an int or a string, got {pid!r:.80}")
    where = f"{where} (problem_id={pid!r})"
    texts = {}
    for name in ("problem", "reasoning"):
        key, value = _field(rec, name)
        if value is None:
            names = " or ".join(repr(k) for k in _ALIASES[name])
            raise RecordError(f"{where}: missing field {names} (expected a non-empty string)")
        if not isinstance(value, str) or not value.strip():
            raise RecordError(f"{where}: field {key!r} must be a non-empty string, got {value!r:.80}")
        texts[name] = value
    score = rec.get("score")
    if isinstance(score, str):
        try:
            score = float(score)
        except ValueError:
            pass
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise RecordError(f"{where}: field 'score' must be a number in [0, 1], got {score!r:.80}")
    if math.isnan(score) or not 0.0 <= score <= 1.0:
        raise RecordError(f"{where}: field 'score' is {score}; expected a number in [0, 1]")
    key, rel = _field(rec, "path")
    if rel is not None and (not isinstance(rel, str) or not rel):
        raise RecordError(f"{where}: field {key!r} must be a non-empty string path, got {rel!r:.80}")
    return ThinkingRecord(
        problem_id=str(pid), problem=texts["problem"], reasoning=texts["reasoning"],
        score=float(score), image_path=str(image_root / rel) if rel else None, where=where,
    )


def load_thinking_records(path: str | Path, image_root: str | Path | None = None
                          ) -> list[ThinkingRecord]:
    """Load and validate a SophiaVL-R1-Thinking file; the first bad record raises."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"data file {path} does not exist")
    root = Path(image_root) if image_root else path.parent
    records = [validate_thinking_record(rec, where, root, i)
               for i, (where, rec) in enumerate(read_raw_records(path))]
    if not records:
        raise RecordError(f"{path}: no records")
    seen: dict[str, str] = {}
    for rec in records:
        if rec.problem_id in seen:
            raise RecordError(f"{path}: problem_id {rec.problem_id!r} appears twice "
                              f"({seen[rec.problem_id]} and {rec.where})")
        seen[rec.problem_id] = rec.where
    logger.info("loaded %d thinking records from %s", len(records), path)
    return records


# ------------------------------------------------------------------ texts


def score_text(score: float) -> str:
    """``<answer>0.7</answer>``: the score on the client's grid {0.0, 0.1, …, 1.0}."""
    # Half-up rounding (Python's round() rounds half to even: 0.65 -> 0.6).
    return f"<answer>{math.floor(score * 10 + 0.5) / 10:.1f}</answer>"


def trm_prompt(chat: PreTrainedTokenizerBase, record: ThinkingRecord, thinking: ThinkingRewardConfig) -> str:
    """The TRM prompt (chat template applied, generation prompt open) for ``record``.

    Built with the client's own :func:`~sophiavl_mcore.rewards.thinking.build_messages`
    (same system prompt, instruction, reasoning truncation), so training and serving
    see the same text.
    """
    request = ThinkingRequest(question=record.problem, reasoning=record.reasoning,
                              images=[record.image_path] if record.image_path else [])
    return chat.apply_chat_template(build_messages(request, thinking), tokenize=False,
                                    add_generation_prompt=True)


def default_reasoning(record: Record) -> str:
    """A neutral reasoning text for warm-start targets when none is supplied."""
    return f"I read the question and the image carefully, then work out the answer: {record.answer}."


def policy_target(record: Record, reasoning: str) -> str:
    return f"<think>{reasoning}</think><answer>{record.answer}</answer>"


# ------------------------------------------------------------------ builder


@dataclasses.dataclass
class PromptTarget:
    """Untokenised example: ``prompt`` holds at most one ``<|image_pad|>`` per image."""

    prompt: str
    target: str
    image_path: str | None
    source: str


class ExampleBuilder:
    """Tokenises prompt/target pairs and loads their images (DALI, via the data package).

    ``stats`` counts dropped examples: ``data/skipped_<image reason>`` (from the image
    loader) and ``data/skipped_too_long``; ``data/examples`` counts built ones.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_cfg: ImageConfig | None = None,
                 max_seq_len: int = 4096, image_loader: ImageLoader | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_cfg = image_cfg or ImageConfig()
        self._loader = image_loader
        self.max_seq_len = max_seq_len
        self.stats: Counter[str] = Counter()
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if eos is None or eos < 0:
            raise ValueError("tokenizer has no <|im_end|> token (not a Qwen chat tokenizer)")
        self.eos_id = int(eos)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        self.image_pad_id = int(tokenizer.convert_tokens_to_ids(IMAGE_PAD))

    @property
    def loader(self) -> ImageLoader:
        if self._loader is None:
            self._loader = ImageLoader(self.image_cfg)
        return self._loader

    def metrics(self) -> dict[str, float]:
        out = {f"data/{k}": float(v) for k, v in self.stats.items()}
        if self._loader is not None:
            out.update(self.loader.metrics())
        return out

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def build(self, items: Sequence[PromptTarget]) -> list[SFTExample]:
        """Examples for ``items`` in order, minus those dropped (counted in ``stats``)."""
        paths = [it.image_path for it in items]
        batch = self.loader.load(paths) if any(p is not None for p in paths) else None
        examples = []
        for i, it in enumerate(items):
            pixel_values = grid = None
            prompt = it.prompt
            if it.image_path is not None:
                assert batch is not None
                if batch.image_index[i] is None:
                    # Counted by the image loader as data/skipped_<reason>.
                    logger.warning("dropping %s: image %s skipped (%s)", it.source,
                                   it.image_path, batch.skipped.get(i, "unknown"))
                    continue
                row = batch.image_index[i]
                grid = batch.image_grid_thw[row:row + 1]
                pixel_values = batch.pixel_values[batch.patch_slice(i)]
                prompt = expand_image_tokens(prompt, grid.tolist(), self.image_cfg.merge_size)
            elif IMAGE_PAD in prompt:
                raise ValueError(f"{it.source}: prompt has {IMAGE_PAD} but the record has no image")
            prompt_ids = self._encode(prompt)
            target_ids = self._encode(it.target) + [self.eos_id]
            ids = prompt_ids + target_ids
            if len(ids) > self.max_seq_len:
                self.stats["skipped_too_long"] += 1
                logger.warning("dropping %s: %d tokens > max_seq_len=%d", it.source, len(ids),
                               self.max_seq_len)
                continue
            if grid is not None:
                expected = int(grid.prod()) // self.image_cfg.merge_size ** 2
                got = ids.count(self.image_pad_id)
                if got != expected:
                    raise ValueError(f"{it.source}: {got} image tokens after tokenisation, "
                                     f"expected {expected} for grid {grid.tolist()}")
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[len(prompt_ids):] = True
            examples.append(SFTExample(torch.tensor(ids, dtype=torch.long), mask,
                                       pixel_values, grid, it.source))
        self.stats["examples"] += len(examples)
        return examples

    def trm_examples(self, records: Sequence[ThinkingRecord],
                     thinking: ThinkingRewardConfig | None = None) -> list[SFTExample]:
        """TRM examples: client prompt → ``<answer>score</answer>``."""
        thinking = thinking or ThinkingRewardConfig()
        return self.build([PromptTarget(trm_prompt(self.tokenizer, r, thinking),
                                        score_text(r.score), r.image_path, r.where)
                           for r in records])

    def policy_examples(self, records: Sequence[Record], prompt_cfg: PromptConfig | None = None,
                        reasoning: Callable[[Record], str] = default_reasoning
                        ) -> list[SFTExample]:
        """Warm-start examples: GRPO prompt → ``<think>…</think><answer>…</answer>``."""
        return self.build([PromptTarget(build_prompt(r, self.tokenizer, prompt_cfg),
                                        policy_target(r, reasoning(r)), r.image_path,
                                        f"{r.data_source}/{r.problem_id}")
                           for r in records])


def image_config_for(model_dir: str | Path, base: ImageConfig | None = None) -> ImageConfig:
    """``base`` with min/max pixels from the model's processor config, so that training
    sees the image sizes vLLM's processor produces when serving.

    Reads ``preprocessor_config.json`` (hub layout) or the ``image_processor`` section of
    ``processor_config.json`` (transformers 5); keys ``min_pixels``/``max_pixels`` or
    ``size.shortest_edge``/``size.longest_edge`` (both in pixels for Qwen2-VL).
    """
    import json

    base = base or ImageConfig()
    root = Path(model_dir)
    proc = None
    if (root / "preprocessor_config.json").is_file():
        proc = json.loads((root / "preprocessor_config.json").read_text())
    elif (root / "processor_config.json").is_file():
        proc = json.loads((root / "processor_config.json").read_text()).get("image_processor")
    if not proc:
        logger.warning("%s: no image processor config; using images.min_pixels=%d max_pixels=%d",
                       model_dir, base.min_pixels, base.max_pixels)
        return base
    size = proc.get("size") or {}
    min_pixels = proc.get("min_pixels") or size.get("shortest_edge") or base.min_pixels
    max_pixels = proc.get("max_pixels") or size.get("longest_edge") or base.max_pixels
    return dataclasses.replace(base, min_pixels=int(min_pixels), max_pixels=int(max_pixels))
