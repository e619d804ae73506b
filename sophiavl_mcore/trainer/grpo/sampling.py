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

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from sophiavl_mcore.data.records import Record
from sophiavl_mcore.parallel.collectives import host_all_gather, host_all_reduce
from sophiavl_mcore.rewards.stage import GroupScores
from sophiavl_mcore.trainer.grpo.step_data import EngineRollout, is_counter

if TYPE_CHECKING:
    from sophiavl_mcore.trainer.grpo.metrics import PhaseTimer
    from sophiavl_mcore.trainer.grpo.trainer import GRPOTrainer


def has_signal(roll: EngineRollout, scores: GroupScores, tol: float = 1e-9) -> np.ndarray:
    """bool [G]: generated groups whose final rewards are not all equal."""
    reward = scores.trust.reward.reshape(-1, roll.n)
    generated = np.array([r is not None for r in roll.results], dtype=bool)
    return generated & (np.ptp(reward, axis=1) > tol)


def select_groups(roll: EngineRollout, scores: GroupScores, groups: list[int]
                  ) -> tuple[EngineRollout, GroupScores]:
    """The ``groups`` (indices into ``roll``) of one round, rollout and scores alike."""
    n = roll.n
    rows = np.concatenate([np.arange(g * n, (g + 1) * n) for g in groups]) if groups else np.zeros(0, int)
    part = EngineRollout(roll.first_group, [roll.records[g] for g in groups],
                         [roll.results[g] for g in groups], [roll.images[g] for g in groups], n)
    return part, _take(scores, rows, np.asarray(groups, dtype=int), len(roll.records))


def concat_groups(parts: list[tuple[EngineRollout, GroupScores]], first_group: int
                  ) -> tuple[EngineRollout, GroupScores]:
    """Several rounds' selected groups as one engine rollout starting at ``first_group``."""
    rolls, scores = [p[0] for p in parts], [p[1] for p in parts]
    roll = EngineRollout(first_group, [r for x in rolls for r in x.records],
                         [r for x in rolls for r in x.results], [i for x in rolls for i in x.images],
                         rolls[0].n)
    return roll, _cat(scores)


def _take(scores: GroupScores, rows: np.ndarray, groups: np.ndarray, num_groups: int) -> GroupScores:
    def pick(v: Any) -> Any:
        if isinstance(v, np.ndarray) and v.ndim >= 1:
            return v[groups] if v.shape[0] == num_groups else v[rows]
        return v

    trust = dataclasses.replace(scores.trust, **{
        f.name: pick(getattr(scores.trust, f.name)) for f in dataclasses.fields(scores.trust)})
    trust = dataclasses.replace(trust, num_groups=len(groups))
    return GroupScores(*(pick(getattr(scores, f.name)) if f.name != "trust" else trust
                         for f in dataclasses.fields(scores)))


def _cat(parts: list[GroupScores]) -> GroupScores:
    def cat(values: list[Any]) -> Any:
        if isinstance(values[0], np.ndarray) and values[0].ndim >= 1:
            return np.concatenate(values)
        return values[0]

    trusts = [p.trust for p in parts]
    trust = dataclasses.replace(trusts[0], **{
        f.name: cat([getattr(t, f.name) for t in trusts]) for f in dataclasses.fields(trusts[0])})
    trust = dataclasses.replace(trust, num_groups=sum(t.num_groups for t in trusts))
    merged = {f.name: cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(parts[0])
              if f.name not in ("trust", "trm_metrics")}
    metrics: dict[str, float] = {}
    for p in parts:
        for k, v in p.trm_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v if is_counter(k) else v
    return GroupScores(trust=trust, trm_metrics=metrics, **merged)


def collect_groups(trainer: GRPOTrainer, step: int, timer: PhaseTimer
                   ) -> tuple[list[Record], EngineRollout, GroupScores, dict[str, float]]:
    """The step's records (all engines'), this engine's rollout and scores, metrics;
    ``timer``: a :class:`~sophiavl_mcore.trainer.grpo.metrics.PhaseTimer` (``rollout`` for
    generation, ``reward`` for scoring)."""
    cfg, layout = trainer.cfg, trainer.layout
    prompts, quota = cfg.train.prompts_per_step, layout.prompts_per_engine
    dynamic = cfg.train.dynamic_sampling
    rounds = 1 + (cfg.train.max_sampling_rounds if dynamic else 0)
    batches: list[list[Record]] = []
    kept: list[tuple[EngineRollout, GroupScores]] = []
    spare: list[tuple[EngineRollout, GroupScores]] = []
    kept_ids: list[int] = []
    spare_ids: list[int] = []
    generated = filtered = 0
    for r in range(rounds):
        records = trainer.sampler.next_batch(prompts)
        batches.append(records)
        active = len(kept_ids) < quota
        with timer("rollout"):
            roll = trainer.rollout(records, step, active=active, round_index=r)
        with timer("reward"):
            scores = trainer.score(roll, step)
        span = layout.prompt_range(trainer.engine_index)
        signal = has_signal(roll, scores) if dynamic else np.ones(len(roll.records), dtype=bool)
        take = [g for g in range(len(roll.records)) if signal[g]][:quota - len(kept_ids)] if active else []
        rest = [g for g in range(len(roll.records)) if g not in take] if active else []
        generated += len(roll.records) if active else 0
        filtered += int((~signal).sum()) if active else 0
        kept.append(select_groups(roll, scores, take))
        spare.append(select_groups(roll, scores, rest))
        kept_ids += [r * prompts + span.start + g for g in take]
        spare_ids += [r * prompts + span.start + g for g in rest]
        short = torch.tensor([quota - len(kept_ids)], dtype=torch.int64)
        host_all_reduce(short, op=dist.ReduceOp.MAX)
        if int(short) == 0:
            break
    topped = quota - len(kept_ids)
    parts = kept + _first_groups(spare, topped)
    kept_ids += spare_ids[:topped]
    roll, scores = concat_groups(parts, layout.engine_of(trainer.info.rank) * quota)
    out = host_all_gather(torch.tensor(kept_ids, dtype=torch.int64))
    flat = [int(i) for e in range(layout.num_engines) for i in out[layout.leader(e)]]
    step_records = [batches[i // prompts][i % prompts] for i in flat]
    counts = torch.tensor([generated, filtered, topped, r + 1], dtype=torch.float64)
    host_all_reduce(counts)
    world = float(layout.world)  # every rank of an engine counted its engine's groups
    metrics = {"rollout/groups_generated": float(counts[0]) / layout.rtp,
               "rollout/filtered_frac": float(counts[1] / max(float(counts[0]), 1.0)),
               "rollout/zero_variance_kept": float(counts[2]) / layout.rtp,
               "rollout/sampling_rounds": float(counts[3]) / world}
    return step_records, roll, scores, metrics


def _first_groups(spare: list[tuple[EngineRollout, GroupScores]], k: int
                  ) -> list[tuple[EngineRollout, GroupScores]]:
    """The first ``k`` groups over the rounds' spare parts (in round order)."""
    out = []
    for roll, scores in spare:
        if k <= 0:
            break
        take = list(range(min(k, len(roll.records))))
        if take:
            out.append(select_groups(roll, scores, take))
        k -= len(take)
    return out
