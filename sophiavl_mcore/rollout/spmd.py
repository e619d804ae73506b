"""SPMD vLLM engines inside the trainer's world (``external_launcher``).

Every rank builds ``LLM(tensor_parallel_size=RTP, data_parallel_size=world/RTP,
distributed_executor_backend="external_launcher")`` *after* the trainer's process group
exists: vLLM adopts that world, forms its TP groups from blocks of RTP consecutive
ranks (its data-parallel rank is ``RANK // RTP``) and each block is one independent
engine that generates its own prompts; TP ranks of one engine agree token for token
(same seed, same inputs). World collectives keep working afterwards.

Closing: vLLM's shutdown would also destroy the default process group, which is the
trainer's; :func:`close_spmd_engine` keeps it alive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from sophiavl_mcore.rollout.config import RolloutConfig
from sophiavl_mcore.rollout.layout import EngineLayout

logger = logging.getLogger(__name__)


def build_spmd_engine(cfg: RolloutConfig, layout: EngineLayout) -> Any:
    """This rank's share of engine ``layout.engine_of(rank)`` (collective: all ranks)."""
    from sophiavl_mcore.rollout.vllm_engine import VllmRolloutEngine

    spmd = dataclasses.replace(cfg, tensor_parallel_size=layout.rtp,
                               distributed_executor_backend="external_launcher")
    return VllmRolloutEngine(spmd, data_parallel_size=layout.num_engines)


@contextlib.contextmanager
def keep_default_group() -> Iterator[None]:
    """vLLM's shutdown ends with ``destroy_distributed_environment``, which would destroy
    the default process group — the trainer's. Inside this context it does not."""
    from vllm.distributed import parallel_state as vps

    original = vps.destroy_distributed_environment
    vps.destroy_distributed_environment = lambda: None
    try:
        yield
    finally:
        vps.destroy_distributed_environment = original


def close_spmd_engine(engine: Any) -> None:
    """Shut the engine down without destroying the trainer's default process group."""
    if engine is None:
        return
    with keep_default_group():
        engine.close()
