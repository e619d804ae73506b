"""Greedy validation on a held-out split: accuracy per problem_type (``val/`` metrics).

Every rollout engine answers its contiguous slice of the records (one greedy sample
each) and grades it; per-record results meet on every rank through one all-gather of
fixed-size tensors, so every rank returns the same metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from sophiavl_mcore.data.records import Record
from sophiavl_mcore.parallel.collectives import host_all_reduce
from sophiavl_mcore.rollout.exchange import gather_engines
from sophiavl_mcore.trainer.grpo.step_data import build_requests

if TYPE_CHECKING:
    from sophiavl_mcore.trainer.grpo.trainer import GRPOTrainer

logger = logging.getLogger(__name__)


def _answer_slice(trainer: GRPOTrainer, records: Sequence[Record]) -> np.ndarray:
    """Per record of this engine's slice (padded to ``ceil(len/E)`` rows): [answered,
    accuracy, well_formed]."""
    from sophiavl_mcore.rewards.outcome import OutcomeSample, score_outcomes

    layout = trainer.layout
    per = math.ceil(len(records) / layout.num_engines)
    e = layout.engine_of(trainer.info.rank)
    mine = list(records[min(e * per, len(records)):min((e + 1) * per, len(records))])
    out = np.zeros((per, 3))
    images = trainer.image_loader.load([r.image_path for r in mine])
    reqs, kept, _ = build_requests(mine, images, trainer.tokenizer, trainer.cfg.prompt,
                                   "left out of validation")
    greedy = dataclasses.replace(trainer.cfg.rollout.sampling, n=1, temperature=0.0, seed=0)
    trainer.engine.wake_up()  # asleep since the update (GPU: memory back from the trainer)
    results = trainer.engine.generate(reqs, greedy)
    scores = score_outcomes([OutcomeSample(mine[i].problem_type, mine[i].solution,
                                           res.samples[0].text, mine[i].options)
                             for i, res in zip(kept, results, strict=True)])
    for j, i in enumerate(kept):
        out[i] = (1.0, scores.accuracy[j], scores.well_formed[j])
    return out


def evaluate(trainer: GRPOTrainer, records: Sequence[Record]) -> dict[str, float]:
    """Collective: greedy answers on every engine, graded; same metrics on every rank."""
    layout = trainer.layout
    per = math.ceil(len(records) / layout.num_engines)
    failed = 0.0
    try:
        local = _answer_slice(trainer, records)
    except Exception:  # a failed validation must not stop training
        logger.exception("validation failed on rank %d", trainer.info.rank)
        local, failed = np.zeros((per, 3)), 1.0
    if float(host_all_reduce(torch.tensor([failed]), op=dist.ReduceOp.MAX)):  # any rank
        return {"val/failed": 1.0}
    parts = gather_engines(layout, torch.from_numpy(local.reshape(-1)))
    rows = np.concatenate([t.numpy().reshape(per, 3) for t in parts])[:len(records)]
    answered = rows[:, 0] > 0
    kept = [r for r, a in zip(records, answered, strict=True) if a]
    return _per_type(kept, rows[answered, 1], rows[answered, 2])


def _per_type(records: Sequence[Record], accuracy: np.ndarray, well_formed: np.ndarray
              ) -> dict[str, float]:
    out = {"val/accuracy": float(accuracy.mean()) if len(accuracy) else float("nan"),
           "val/format_ok_frac": float(well_formed.mean()) if len(well_formed) else float("nan"),
           "val/size": float(len(records))}
    types = np.array([r.problem_type for r in records])
    for t in sorted(set(types.tolist())):
        out[f"val/{t.replace(' ', '_')}/accuracy"] = float(accuracy[types == t].mean())
    return out
