"""The reward stage of one engine's groups, in one place: outcome R^o (rules), thinking
R^t (the TRM client), then Trust-GRPO (γ per group, annealing) and group advantages.

Every quantity here is per group, so each rollout engine scores its own groups and no
rank needs the others' responses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sophiavl_mcore.data.records import Record
from sophiavl_mcore.rewards.config import RewardsConfig
from sophiavl_mcore.rewards.thinking import ThinkingRewardClient
from sophiavl_mcore.rewards.trust_grpo import (
    group_advantages,
    needs_thinking_score,
    trust_grpo,
)
from sophiavl_mcore.rollout.batch import StepBatch


def outcome_scores(records: Sequence[Record], texts: Sequence[Sequence[str]], cfg: RewardsConfig
                   ) -> Any:
    """Rule-based R^o of every response (``texts[g][j]``: response j of group g)."""
    from sophiavl_mcore.rewards.outcome import OutcomeSample, score_outcomes

    samples = [OutcomeSample(r.problem_type, r.solution, t, r.options)
               for r, group in zip(records, texts, strict=True) for t in group]
    return score_outcomes(samples, cfg.format_weight)


def thinking_requests(records: Sequence[Record], texts: Sequence[Sequence[str]],
                      images: Sequence[Any], graded: np.ndarray) -> tuple[list[list[int]], list[Any]]:
    """TRM requests for the responses ``graded`` [M] marks, each distinct reply of a group
    once, and for each request the flat indices of the responses it scores.

    A group's samples often repeat a reply word for word (a policy that has learned the
    task converges on one); the TRM grades (question, image, reply) at temperature 0, so
    one request scores every copy."""
    from sophiavl_mcore.rewards.thinking import ThinkingRequest

    targets: list[list[int]] = []
    reqs: list[Any] = []
    k = 0
    for r, group, image in zip(records, texts, images, strict=True):
        seen: dict[str, int] = {}  # reply text -> its request in ``reqs``
        for t in group:
            if graded[k]:
                if t not in seen:
                    seen[t] = len(reqs)
                    targets.append([])
                    reqs.append(ThinkingRequest(r.problem, t, [image] if image is not None else []))
                targets[seen[t]].append(k)
            k += 1
    return targets, reqs


def score_groups(batch: StepBatch, trm: ThinkingRewardClient | None, cfg: RewardsConfig, *,
                 step: int, total_steps: int,
                 agree: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """Adds R^o, R^t, Trust-GRPO and advantages to ``batch`` (an engine's group-major
    groups, with texts): columns ``outcome``, ``accuracy``, ``well_formed``, ``thinking``
    (NaN = not scored), ``reward``, ``advantage`` f64 [M]; group columns ``gamma``,
    ``mu_correct``, ``mu_wrong``, ``skipped`` f64 [G]; scalars ``reward/annealing`` and the
    TRM client's counters. ``step``: 0-based (the annealing exponent). No TRM (or
    ``use_thinking`` off): R^t stays NaN. ``agree``: makes every rank that scores these
    groups hold the same R^t [M] (e.g. a broadcast from the one rank that asked the TRM)
    before γ is computed. Groups not generated get advantage 0."""
    n, texts = batch.n, batch.texts_by_group()
    scores = outcome_scores(batch.records, texts, cfg)
    thinking = np.full(len(scores.reward), np.nan)
    trm_metrics: dict[str, float] = {}
    if trm is not None and cfg.trust_grpo.use_thinking:
        # No <think> block to grade when the format gate fails: those stay NaN (and with
        # trust_grpo.thinking_min_outcome, low outcomes get 0 without a TRM call).
        graded = needs_thinking_score(scores.reward, scores.well_formed, cfg.trust_grpo)
        targets, reqs = thinking_requests(batch.records, texts, batch.images or [None] * batch.num_groups,
                                          graded)
        if reqs:
            ts = trm.score(reqs)
            for rows, score in zip(targets, ts.scores, strict=True):
                thinking[rows] = score
            trm_metrics = ts.metrics("reward/trm")
            trm_metrics["reward/trm_failures"] = float(sum(ts.failures.values()))
            trm_metrics["reward/trm_requests"] = float(len(reqs))
            trm_metrics["reward/trm_repeats_frac"] = 1.0 - len(reqs) / float(graded.sum())
    if agree is not None:
        thinking = agree(thinking)
    trust = trust_grpo(scores.reward, thinking, group_size=n, step=step, total_steps=total_steps,
                       config=cfg.trust_grpo)
    adv = np.asarray(group_advantages(trust.reward, group_size=n, config=cfg.trust_grpo), np.float64)
    adv[~batch.generated] = 0.0
    skipped = np.zeros(batch.num_groups) if trust.skipped is None else trust.skipped
    batch.add_columns(outcome=scores.reward, accuracy=scores.accuracy,
                      well_formed=scores.well_formed, thinking=thinking, reward=trust.reward,
                      advantage=adv)
    batch.add_group_columns(gamma=trust.gamma, mu_correct=trust.mu_correct,
                            mu_wrong=trust.mu_wrong, skipped=skipped)
    batch.scalars.update(trm_metrics)
    batch.scalars["reward/annealing"] = float(trust.annealing)
