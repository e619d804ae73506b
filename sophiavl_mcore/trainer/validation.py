"""Greedy validation on a held-out split: accuracy per problem_type (``val/`` metrics)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch.distributed as dist

from sophiavl_mcore.data.records import Record

logger = logging.getLogger(__name__)


def evaluate(run: Any, records: Sequence[Record]) -> dict[str, float]:
    """Collective: rank 0 answers every record greedily (one sample, temperature 0)
    with the engine's current weights and grades it; all ranks return the metrics."""
    from sophiavl_mcore.data.prompts import build_prompt
    from sophiavl_mcore.rewards.outcome import OutcomeSample, score_outcomes
    from sophiavl_mcore.rollout.interface import RolloutRequest

    box: list[Any] = [None]
    if run.info.rank == 0:
        try:
            images = run.image_loader.load([r.image_path for r in records])
            reqs, kept = [], []
            for i, r in enumerate(records):
                img = images.vllm_image(i)
                if r.image_path is not None and img is None:
                    continue
                reqs.append(RolloutRequest(prompt=build_prompt(r, run.tokenizer, run.cfg.prompt),
                                           images=[img] if img is not None else []))
                kept.append(r)
            greedy = dataclasses.replace(run.cfg.rollout.sampling, n=1, temperature=0.0, seed=0)
            results = run.engine.generate(reqs, greedy)
            scores = score_outcomes([OutcomeSample(r.problem_type, r.solution, res.samples[0].text,
                                                   r.options) for r, res in zip(kept, results, strict=True)])
            box[0] = _per_type(kept, scores.accuracy, scores.well_formed)
        except Exception as err:  # a failed validation must not stop training
            logger.exception("validation failed")
            box[0] = {"val/failed": 1.0, "_err": repr(err)}
    dist.broadcast_object_list(box, src=0)
    return {k: v for k, v in box[0].items() if not k.startswith("_")}


def _per_type(records: Sequence[Record], accuracy: np.ndarray, well_formed: np.ndarray
              ) -> dict[str, float]:
    out = {"val/accuracy": float(accuracy.mean()) if len(accuracy) else float("nan"),
           "val/format_ok_frac": float(well_formed.mean()) if len(well_formed) else float("nan"),
           "val/size": float(len(records))}
    types = np.array([r.problem_type for r in records])
    for t in sorted(set(types.tolist())):
        out[f"val/{t.replace(' ', '_')}/accuracy"] = float(accuracy[types == t].mean())
    return out
