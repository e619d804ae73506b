"""The tiny stand-ins a CPU recipe asks for, resolved by the job's entry point.

``model.tiny: true`` asks for a tiny random Qwen2.5-VL policy in
``<output_dir>/tiny_model``; ``rewards.trm.tiny: true`` for the tiny dots TRM
(:mod:`~sophiavl_mcore.testing.tiny_trm`, trained once and cached). Production code sees
only ordinary paths: :func:`resolve_stand_ins` runs before the trainer is built (rank 0
writes, before any process group exists; the other ranks read the files once the world
exists) and returns the config with ``rewards.trm.model_dir`` pointing at the tiny TRM.
:func:`score_tiny_trm` scores that TRM's held-out set through the run's own server once
it is up (``<entry>/agreement.json``, cached with the entry).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig
    from sophiavl_mcore.trainer.grpo.trainer import GRPOTrainer


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_stand_ins(cfg: GRPOTrainConfig) -> tuple[GRPOTrainConfig, Path | None]:
    """Build what the recipe's stand-ins need (rank 0); returns the config every rank
    uses and the tiny TRM's cache entry (None: the recipe has none)."""
    from sophiavl_mcore.trainer.setup import model_dir, tiny_spec

    mdir = model_dir(cfg)
    if _rank0() and cfg.model.tiny and not (mdir / "config.json").is_file():
        from sophiavl_mcore.testing.tiny_models import build_tiny_qwen2_5_vl

        build_tiny_qwen2_5_vl(mdir, tiny_spec(cfg))
    return resolve_tiny_trm(cfg)


def resolve_tiny_trm(cfg: GRPOTrainConfig) -> tuple[GRPOTrainConfig, Path | None]:
    """``rewards.trm.tiny``: rank 0 trains (or finds) the tiny TRM; every rank gets the
    config with ``rewards.trm.model_dir`` set, and the cache entry (None: no tiny TRM)."""
    trm = cfg.rewards.trm
    if not (trm.serve and trm.tiny and cfg.rewards.trust_grpo.use_thinking):
        return cfg, None
    if not cfg.task.enabled or cfg.task.reasoning != "observe":
        raise ValueError("rewards.trm.tiny grades the dots task's 'observe' reasoning: set "
                         "task.enabled=true and task.reasoning=observe")
    from sophiavl_mcore.testing.tiny_trm import ensure_tiny_trm, entry_dir

    entry = entry_dir(trm, cfg.task, cfg.rewards.thinking)
    if _rank0():
        try:
            ensure_tiny_trm(trm, cfg.task, cfg.rewards.thinking)
        except BaseException as err:  # the other ranks wait for the server's file
            from sophiavl_mcore.rewards.trm_server import report_start_error

            report_start_error(cfg.output_dir, err)
            raise
    trm = dataclasses.replace(trm, tiny=False, model_dir=str(entry / "hf"))
    return dataclasses.replace(cfg, rewards=dataclasses.replace(cfg.rewards, trm=trm)), entry


def score_tiny_trm(trainer: GRPOTrainer, entry: Path) -> None:
    """Collective: rank 0 scores the tiny TRM's held-out set through the run's server
    (the trainer's ``rewards.thinking`` points at it) unless it is cached; a failure is
    raised on every rank."""
    from sophiavl_mcore.parallel.collectives import run_on_rank
    from sophiavl_mcore.testing.tiny_trm import ensure_agreement

    thinking = trainer.cfg.rewards.thinking
    run_on_rank(lambda: ensure_agreement(entry, thinking))
