"""The step's groups: one round of prompts, or DAPO's dynamic sampling.

Dynamic sampling (``train.dynamic_sampling``): a group whose final rewards are all equal
has zero advantage everywhere — pure cost, no gradient. Each engine keeps only groups
with reward variance and, while any engine is short of its quota (``prompts_per_step /
engines``), every rank draws another round of prompts from the (deterministic, shared)
sampler and the short engines answer their slice of it, at most
``train.max_sampling_rounds`` extra rounds. An engine still short after that tops up
with its zero-variance groups, so the step keeps its shape (and counts them).

Every engine ends with exactly its quota of groups; which prompts they are is agreed
on with one all-gather of prompt ids, so every rank knows the step's records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from sophiavl_mcore.data.records import Record
from sophiavl_mcore.parallel.collectives import host_all_reduce
from sophiavl_mcore.rollout.batch import StepBatch, is_counter
from sophiavl_mcore.rollout.exchange import gather_engines

if TYPE_CHECKING:
    from sophiavl_mcore.trainer.grpo.metrics import PhaseTimer
    from sophiavl_mcore.trainer.grpo.trainer import GRPOTrainer


def has_signal(batch: StepBatch, tol: float = 1e-9) -> np.ndarray:
    """bool [G]: generated groups whose final rewards are not all equal (a scored,
    group-major engine batch)."""
    reward = batch.columns["reward"].reshape(-1, batch.n)
    return (batch.group_columns["generated"] > 0) & (np.ptp(reward, axis=1) > tol)


def collect_groups(trainer: GRPOTrainer, step: int, timer: PhaseTimer
                   ) -> tuple[list[Record], StepBatch, dict[str, float]]:
    """The step's records (all engines'), this engine's scored batch, metrics;
    ``timer``: a :class:`~sophiavl_mcore.trainer.grpo.metrics.PhaseTimer` (``rollout`` for
    generation, ``reward`` for scoring)."""
    cfg, layout = trainer.cfg, trainer.layout
    prompts, quota = cfg.train.prompts_per_step, layout.prompts_per_engine
    dynamic = cfg.train.dynamic_sampling
    rounds = 1 + (cfg.train.max_sampling_rounds if dynamic else 0)
    batches: list[list[Record]] = []
    kept: list[StepBatch] = []
    spare: list[StepBatch] = []
    kept_ids: list[int] = []
    spare_ids: list[int] = []
    scalars: dict[str, float] = {}  # every round's TRM counters (requests really sent)
    generated = filtered = 0
    for r in range(rounds):
        records = trainer.sampler.next_batch(prompts)
        batches.append(records)
        active = len(kept_ids) < quota
        with timer("rollout"):
            batch = trainer.rollout(records, step, active=active, round_index=r)
        with timer("reward"):
            trainer.score(batch, step)
        for k, v in batch.scalars.items():
            scalars[k] = scalars.get(k, 0.0) + v if is_counter(k) else v
        span = layout.prompt_range(trainer.engine_index)
        g = batch.num_groups
        signal = has_signal(batch) if dynamic else np.ones(g, dtype=bool)
        take = [i for i in range(g) if signal[i]][:quota - len(kept_ids)] if active else []
        rest = [i for i in range(g) if i not in take] if active else []
        generated += g if active else 0
        filtered += int((~signal).sum()) if active else 0
        kept.append(batch.select_groups(take))
        spare.append(batch.select_groups(rest))
        kept_ids += [r * prompts + span.start + i for i in take]
        spare_ids += [r * prompts + span.start + i for i in rest]
        short = torch.tensor([quota - len(kept_ids)], dtype=torch.int64)
        host_all_reduce(short, op=dist.ReduceOp.MAX)
        if int(short) == 0:
            break
    topped = quota - len(kept_ids)
    mine = StepBatch.concat(kept + _first_groups(spare, topped))
    kept_ids += spare_ids[:topped]
    first = layout.engine_of(trainer.info.rank) * quota
    mine.group_id = np.arange(first, first + quota)  # the groups' places in the step
    mine.scalars = scalars
    flat = [int(i) for t in gather_engines(layout, torch.tensor(kept_ids, dtype=torch.int64))
            for i in t]
    step_records = [batches[i // prompts][i % prompts] for i in flat]
    counts = torch.tensor([generated, filtered, topped, r + 1], dtype=torch.float64)
    host_all_reduce(counts)
    world = float(layout.world)  # every rank of an engine counted its engine's groups
    metrics = {"rollout/groups_generated": float(counts[0]) / layout.rtp,
               "rollout/filtered_frac": float(counts[1] / max(float(counts[0]), 1.0)),
               "rollout/zero_variance_kept": float(counts[2]) / layout.rtp,
               "rollout/sampling_rounds": float(counts[3]) / world}
    return step_records, mine, metrics


def _first_groups(spare: list[StepBatch], k: int) -> list[StepBatch]:
    """The first ``k`` groups over the rounds' spare parts (in round order)."""
    out = []
    for part in spare:
        if k <= 0:
            break
        take = list(range(min(k, part.num_groups)))
        if take:
            out.append(part.select_groups(take))
        k -= len(take)
    return out
