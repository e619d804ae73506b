"""Typed configuration of the rollout engine (the single source of its defaults)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass
class SamplingConfig:
    """How responses are sampled (maps onto vLLM ``SamplingParams``).

    ``seed``: when set, prompt ``i`` of a ``generate`` call uses ``seed + i`` (and vLLM
    derives its ``n`` children from that), so a call is reproducible while prompts
    still differ. ``logprobs``: how many top alternatives to return per generated
    token besides the sampled one (0 = only the sampled token's log-prob).
    ``regex``: constrain the output to this regular expression (structured outputs).
    ``forbid_vision_tokens``: the image markers (``<|image_pad|>`` …) are never sampled
    (a bias of -100 on their logits): a response containing one would be read as an
    image slot when the trainer re-scores it.
    """

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = disabled
    max_tokens: int = 1024
    stop: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = None
    logprobs: int = 0
    regex: str | None = None
    forbid_vision_tokens: bool = True

    def __post_init__(self) -> None:
        errors = []
        if self.n < 1:
            errors.append(f"n={self.n} must be >= 1")
        if self.temperature < 0:
            errors.append(f"temperature={self.temperature} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            errors.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < -1:
            errors.append(f"top_k={self.top_k} must be -1 or 0 (disabled) or >= 1")
        if self.max_tokens < 1:
            errors.append(f"max_tokens={self.max_tokens} must be >= 1")
        if not 0 <= self.logprobs <= 20:
            errors.append(f"logprobs={self.logprobs} must be in [0, 20]")
        if errors:
            raise ValueError("rollout.sampling: " + "; ".join(errors))


@dataclasses.dataclass
class RolloutConfig:
    """The colocated vLLM engine.

    ``gpu_memory_utilization`` is the fraction of GPU memory vLLM may take (weights +
    KV cache) while awake; ``cpu_kv_cache_gb`` is the KV cache size (GiB) on the CPU
    backend. ``sleep_level`` 1 offloads weights to host memory and drops the KV cache;
    2 drops both (the next weight sync must then load every tensor).
    ``logprobs_mode``: ``processed_logprobs`` returns log-probs of the distribution
    actually sampled from (after temperature / top-k / top-p); ``raw_logprobs`` those
    of the model's logits.
    """

    model: str = ""
    tokenizer: str | None = None
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16"
    tensor_parallel_size: int = 1
    distributed_executor_backend: Literal["uni", "external_launcher", "mp"] = "uni"
    max_model_len: int = 4096
    max_num_seqs: int = 256
    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_gb: int = 1
    enable_sleep_mode: bool = True
    sleep_level: int = 1
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    max_images_per_prompt: int = 1
    logprobs_mode: Literal["processed_logprobs", "raw_logprobs"] = "processed_logprobs"
    seed: int = 0
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        errors = []
        if self.tensor_parallel_size < 1:
            errors.append(f"tensor_parallel_size={self.tensor_parallel_size} must be >= 1")
        if self.max_model_len < 16:
            errors.append(f"max_model_len={self.max_model_len} must be >= 16")
        if self.max_num_seqs < 1:
            errors.append(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            errors.append(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.cpu_kv_cache_gb < 1:
            errors.append(f"cpu_kv_cache_gb={self.cpu_kv_cache_gb} must be >= 1")
        if self.sleep_level not in (1, 2):
            errors.append(f"sleep_level={self.sleep_level} must be 1 or 2")
        if self.max_images_per_prompt < 0:
            errors.append(f"max_images_per_prompt={self.max_images_per_prompt} must be >= 0")
        if self.sampling.max_tokens >= self.max_model_len:
            errors.append(
                f"sampling.max_tokens={self.sampling.max_tokens} leaves no room for the prompt "
                f"in max_model_len={self.max_model_len}"
            )
        if errors:
            raise ValueError("rollout: " + "; ".join(errors))
