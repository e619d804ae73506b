"""The data package's typed config sections: records and their mixing (``data``), the
synthetic dots task (``task``), prompt texts (``prompt``) and image preprocessing
(``images``). Job configs (``trainer.config``) compose them; the modules that use them
(``records``, ``visual_task``, ``prompts``, ``images``) import them from here."""

from __future__ import annotations

import dataclasses
from typing import Literal

from sophiavl_mcore.data.schema import PROBLEM_TYPES

# OpenAI CLIP statistics, as Qwen2-VL / Qwen2.5-VL's image processor uses them (0..1 scale).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class DataSourceConfig:
    """One data file and how much of each epoch it supplies."""

    path: str = ""
    image_root: str = ""  # default: the directory of ``path``
    weight: float = 1.0
    name: str = ""  # default: the file name without suffix


@dataclasses.dataclass
class DataConfig:
    """Record sources and the sampler's order (prompt/image settings live beside it)."""

    sources: list[DataSourceConfig] = dataclasses.field(default_factory=list)
    seed: int = 1234
    shuffle: bool = True
    epoch_size: int = 0  # 0: the sum of the sources' sizes

    def __post_init__(self) -> None:
        if self.epoch_size < 0:
            raise ValueError(f"data.epoch_size must be >= 0 (0 = sum of sources), got {self.epoch_size}")
        for i, src in enumerate(self.sources):
            if not (src.weight > 0):
                raise ValueError(f"data.sources[{i}] ({src.path!r}): weight must be > 0, got {src.weight}")


@dataclasses.dataclass
class VisualTaskConfig:
    """The synthetic dots task (sizes in pixels).

    Attributes:
        enabled: generate the task into ``<output_dir>/task`` and train on it (replaces
            ``data.sources``).
        num_train / num_val: records in the train / held-out split.
        max_count: answers are 1 … max_count.
        image_size: square image side; 56 gives a 2×2 grid of merged vision tokens.
        radius: disc radius.
        seed: generator seed (train and val use disjoint streams).
        reasoning: "free" — the warm start writes ``warm_start.reasoning`` verbatim;
            "observe" — it writes ``N dots`` with N = the (random) answer, the reasoning
            the tiny TRM grades (:mod:`~sophiavl_mcore.data.dots_reasoning`).
        hacked_frac: share of records in the ``dots_hacked`` source (own random stream:
            the images do not depend on it).
    """

    enabled: bool = False
    num_train: int = 256
    num_val: int = 32
    max_count: int = 4
    image_size: int = 56
    radius: int = 6
    seed: int = 7
    reasoning: Literal["free", "observe"] = "free"
    hacked_frac: float = 0.0

    def __post_init__(self) -> None:
        errors = []
        if self.num_train < 1 or self.num_val < 0:
            errors.append(f"num_train={self.num_train} must be >= 1 and num_val={self.num_val} >= 0")
        if not 1 <= self.max_count <= 9:
            errors.append(f"max_count={self.max_count} must be in [1, 9]")
        if self.radius < 1 or self.image_size < 4 * self.radius:
            errors.append(f"image_size={self.image_size} must be >= 4 * radius={self.radius} (radius >= 1)")
        cells = (self.image_size // (2 * self.radius + 2)) ** 2
        if cells < self.max_count:
            errors.append(f"image_size={self.image_size} with radius={self.radius} fits {cells} "
                          f"dots, fewer than max_count={self.max_count}")
        if not 0.0 <= self.hacked_frac <= 1.0:
            errors.append(f"hacked_frac={self.hacked_frac} must be in [0, 1]")
        if errors:
            raise ValueError("task: " + "; ".join(errors))


_DEFAULT_SYSTEM = (
    "You are a helpful assistant. For every question, first reason about it step by step "
    "and write that reasoning inside <think> </think> tags, then give the final answer "
    "inside <answer> </answer> tags, i.e. <think> reasoning here </think><answer> answer "
    "here </answer>."
)


_DEFAULT_QUESTION = (
    "{question}\nThink the problem through carefully, checking each step, before you "
    "answer. Put the reasoning between <think> and </think> and the final answer between "
    "<answer> and </answer>."
)


_DEFAULT_TYPE_INSTRUCTIONS = {
    "multiple choice": " Answer with the letter of the correct option only (e.g. A, B, C or D) inside <answer> </answer>.",
    "numerical": " Answer with the number only (e.g. 42 or 3.14) inside <answer> </answer>.",
    "OCR": " Transcribe the requested text exactly and put it inside <answer> </answer>.",
    "free-form": " Put your final answer as plain text inside <answer> </answer>.",
}


@dataclasses.dataclass
class PromptConfig:
    """Texts of the prompt; ``{question}`` in the template is replaced by the question."""

    system_prompt: str = _DEFAULT_SYSTEM
    question_template: str = _DEFAULT_QUESTION
    type_instructions: dict[str, str] = dataclasses.field(
        default_factory=lambda: dict(_DEFAULT_TYPE_INSTRUCTIONS)
    )
    option_letters: str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

    def __post_init__(self) -> None:
        if "{question}" not in self.question_template:
            raise ValueError(
                f"prompt.question_template must contain '{{question}}', got {self.question_template!r}"
            )
        unknown = sorted(set(self.type_instructions) - set(PROBLEM_TYPES))
        missing = sorted(set(PROBLEM_TYPES) - set(self.type_instructions))
        if unknown or missing:
            raise ValueError(
                f"prompt.type_instructions must have exactly the keys {list(PROBLEM_TYPES)}; "
                f"unknown {unknown}, missing {missing}"
            )


@dataclasses.dataclass
class ImageConfig:
    """Qwen2.5-VL image preprocessing and the loader's limits (pixels unless stated)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    max_aspect_ratio: float = 200.0
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    max_decode_pixels: int = 1 << 27  # ~134 MP; refuse bigger before decoding
    max_file_bytes: int = 256 << 20
    min_side: int = 1
    batch_size: int = 32  # samples per DALI run
    num_threads: int = 2  # DALI CPU threads
    prepare_workers: int = 2  # threads that read files and check headers
    device: Literal["auto", "cpu", "gpu"] = "auto"
    # Who does the bicubic resize: "dali" (fn.resize), "torch" (uint8 antialiased bicubic,
    # the kernel transformers' fast processor uses); "auto": DALI on GPU, torch on CPU,
    # where DALI's CPU resampler is several times slower (see bench/bench_images.py).
    resize_backend: Literal["auto", "dali", "torch"] = "auto"
    # CPU pixel_values buffers kept for reuse once their batch is dropped (0: a fresh
    # mapping per batch); see PatchBufferPool.
    reuse_buffers: int = 2

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def __post_init__(self) -> None:
        f = self.factor
        if self.patch_size <= 0 or self.merge_size <= 0 or self.temporal_patch_size <= 0:
            raise ValueError(
                f"images: patch_size={self.patch_size}, merge_size={self.merge_size}, "
                f"temporal_patch_size={self.temporal_patch_size} must all be > 0"
            )
        if not (f * f <= self.min_pixels <= self.max_pixels):
            raise ValueError(
                f"images: need factor²={f * f} <= min_pixels={self.min_pixels} <= max_pixels={self.max_pixels}"
            )
        if self.max_aspect_ratio < 1:
            raise ValueError(f"images.max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")
        if self.reuse_buffers < 0:
            raise ValueError(f"images.reuse_buffers must be >= 0, got {self.reuse_buffers}")
        if min(self.batch_size, self.num_threads, self.prepare_workers, self.min_side) < 1:
            raise ValueError(
                f"images: batch_size={self.batch_size}, num_threads={self.num_threads}, "
                f"prepare_workers={self.prepare_workers}, min_side={self.min_side} must all be >= 1"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"images: mean {self.image_mean} / std {self.image_std} need 3 values, std > 0")
