"""Rollout: the engine interface and its vLLM implementation.

``VllmRolloutEngine`` is imported lazily (``from sophiavl_mcore.rollout.vllm_engine
import VllmRolloutEngine``) so that importing this package never imports vLLM.
"""

from sophiavl_mcore.rollout.config import RolloutConfig, SamplingConfig
from sophiavl_mcore.rollout.interface import (
    RolloutEngine,
    RolloutRequest,
    RolloutResult,
    RolloutSample,
    RolloutWeightError,
)

__all__ = [
    "RolloutConfig",
    "RolloutEngine",
    "RolloutRequest",
    "RolloutResult",
    "RolloutSample",
    "RolloutWeightError",
    "SamplingConfig",
]
