"""The reward stage's configuration: outcome reward, thinking reward (TRM client), the TRM
the job may serve itself, and Trust-GRPO. One section, used by the GRPO trainer
(``rewards:`` in a training recipe) and by the reward demo."""

from __future__ import annotations

import dataclasses

from sophiavl_mcore.rewards.thinking import ThinkingRewardConfig
from sophiavl_mcore.rewards.trust_grpo import TrustGRPOConfig


@dataclasses.dataclass
class LocalTRMConfig:
    """A TRM the job serves itself (``rewards.trm``).

    Attributes:
        serve: start a vLLM OpenAI-compatible server for the run and point
            ``rewards.thinking`` at it (backend ``http``); False = use
            ``rewards.thinking`` as configured (an external server, or in-process).
        model_dir: HF checkpoint of the TRM (e.g. the released SophiaVL-R1 TRM).
        tiny: serve the tiny dots TRM instead (built and trained once, then cached;
            :mod:`sophiavl_mcore.testing.tiny_trm`). Needs ``task.reasoning: observe``.
        tiny_recipe: the ``trm_train`` recipe the tiny TRM is trained with (relative
            paths: to the repository root).
        tiny_records: images in the tiny TRM's training set (3 anchors and 8 graded
            replies each, :data:`~sophiavl_mcore.testing.tiny_trm.SAMPLES_PER_IMAGE`).
        tiny_heldout: held-out images (4 graded replies each) for its agreement figures.
        cache_dir: where the tiny TRM is cached ("" = ``$SOPHIAVL_CACHE`` or
            ``~/.cache/sophiavl_mcore``).
        startup_timeout_s: how long the server may take to answer ``/health``.
        kv_cache_gb: the server's CPU KV cache (GiB).
        max_num_seqs: requests the server batches at once.
    """

    serve: bool = False
    model_dir: str = ""
    tiny: bool = False
    tiny_recipe: str = "examples/configs/trm_dots_tiny.yaml"
    tiny_records: int = 768
    tiny_heldout: int = 96
    cache_dir: str = ""
    startup_timeout_s: float = 600.0
    kv_cache_gb: int = 1
    max_num_seqs: int = 128

    def __post_init__(self) -> None:
        errors = []
        if self.serve and not (self.tiny or self.model_dir):
            errors.append("serve=true needs model_dir or tiny=true")
        if self.tiny and self.model_dir:
            errors.append(f"tiny=true and model_dir={self.model_dir!r}: choose one")
        if self.tiny_records < 8 or self.tiny_heldout < 1:
            errors.append(f"tiny_records={self.tiny_records} must be >= 8 and "
                          f"tiny_heldout={self.tiny_heldout} >= 1")
        if self.startup_timeout_s <= 0 or self.kv_cache_gb < 1 or self.max_num_seqs < 1:
            errors.append(f"startup_timeout_s={self.startup_timeout_s} must be > 0, kv_cache_gb="
                          f"{self.kv_cache_gb} and max_num_seqs={self.max_num_seqs} >= 1")
        if errors:
            raise ValueError("rewards.trm: " + "; ".join(errors))


@dataclasses.dataclass
class RewardsConfig:
    """Outcome + thinking rewards; the paper's ablation switches live in ``trust_grpo``.

    Attributes:
        format_weight: weight of the optional format reward added to R^o (0 = the
            paper's format gate only).
        trust_grpo: γ, annealing, α, the ablation switches and the faithful modes.
        thinking: the TRM client; ``http`` talks to an OpenAI-compatible server (``vllm
            serve``), ``in_process`` grades with the colocated rollout engine.
        trm: a TRM server the job starts itself (``trm.serve``); when on, ``thinking``
            is pointed at it (backend ``http``, its URL) at start-up.
    """

    format_weight: float = 0.0
    trust_grpo: TrustGRPOConfig = dataclasses.field(default_factory=TrustGRPOConfig)
    thinking: ThinkingRewardConfig = dataclasses.field(
        default_factory=lambda: ThinkingRewardConfig(backend="in_process"))
    trm: LocalTRMConfig = dataclasses.field(default_factory=LocalTRMConfig)
