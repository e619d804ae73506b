"""The rollout engine interface and its result types.

The trainer only sees :class:`RolloutEngine`; the vLLM implementation (and any later
one) lives behind it, so the algorithm never branches on the backend.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from sophiavl_mcore.rollout.config import SamplingConfig

# Qwen2.5-VL's vision markers: input-only tokens a response must never contain.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                 "<|vision_pad|>")


def vision_token_ids(tokenizer: Any) -> list[int]:
    """Ids of :data:`VISION_TOKENS` that the tokenizer knows (unknown ones are skipped)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    unk = getattr(tokenizer, "unk_token_id", None)
    return [int(i) for i in ids if i is not None and i >= 0 and i != unk]


class RolloutWeightError(RuntimeError):
    """A weight update failed; the engine's ``policy_version`` was not advanced."""


@dataclasses.dataclass
class RolloutRequest:
    """One prompt: either chat-templated text or token ids, plus its images.

    ``prompt`` must already contain one image placeholder per image (for Qwen2.5-VL
    ``<|vision_start|><|image_pad|><|vision_end|>``; vLLM expands it to the image's
    patch count). Images are PIL images or HWC uint8 arrays.
    """

    prompt: str | None = None
    prompt_token_ids: Sequence[int] | None = None
    images: Sequence[Any] = ()

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("RolloutRequest needs exactly one of prompt / prompt_token_ids")


@dataclasses.dataclass
class RolloutSample:
    """One sampled response.

    ``token_ids``: int64 [T]; ``logprobs``: float32 [T], the sampling log-prob (nats)
    of each generated token; ``top_logprobs``: per position, decoded token text ->
    log-prob of the best alternatives (only when ``SamplingConfig.logprobs > 0``).
    """

    token_ids: np.ndarray
    logprobs: np.ndarray
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    top_logprobs: list[list[tuple[str, float]]] | None = None


@dataclasses.dataclass
class RolloutResult:
    """All samples of one prompt; ``prompt_token_ids`` int64 [P] as the engine saw it."""

    prompt_token_ids: np.ndarray
    samples: list[RolloutSample]


class RolloutEngine(abc.ABC):
    """Generates N samples per prompt and accepts fresh policy weights.

    ``policy_version`` counts successful weight updates (0 = the weights the engine
    was built with); the trainer tags every rollout with it.
    """

    policy_version: int = 0

    @abc.abstractmethod
    def generate(
        self, requests: Sequence[RolloutRequest], sampling: SamplingConfig | None = None
    ) -> list[RolloutResult]:
        """Sample ``sampling.n`` responses per request; results in request order."""

    @abc.abstractmethod
    def load_weights(
        self, weights: Iterable[tuple[str, Any]], version: int | None = None
    ) -> int:
        """Load HF-named full tensors in place; returns the new ``policy_version``.

        ``version`` sets the counter explicitly (e.g. the trainer's step); by default
        it is incremented. On failure raises :class:`RolloutWeightError` and leaves
        the counter unchanged.
        """

    @abc.abstractmethod
    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """Render chat messages (OpenAI-style content parts) into a prompt string."""

    def sleep(self) -> None:  # noqa: B027 - optional capability
        """Release accelerator memory while training runs (no-op where unsupported)."""

    def wake_up(self, tags: list[str] | None = None) -> None:  # noqa: B027
        """Undo :meth:`sleep`; ``tags`` (``["weights"]``, ``["kv_cache"]``) wake parts."""

    def close(self) -> None:  # noqa: B027
        """Free the engine's resources."""
