"""The reward stage's configuration: outcome reward, thinking reward (TRM client), the TRM
the job may serve itself, and Trust-GRPO. One section, used by the GRPO trainer
(``rewards:`` in a training recipe) and by the reward demo."""

from __future__ import annotations

import dataclasses

from sophiavl_mcore.rewards.thinking import ThinkingRewardConfig
from sophiavl_mcore.rewards.trm_server import LocalTRMConfig
from sophiavl_mcore.rewards.trust_grpo import TrustGRPOConfig


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
