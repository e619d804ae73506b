"""One step's data between the engines and the trainer: what an engine produced, the
scalars every rank agrees on for metrics, and this rank's training batch.

Shapes: an engine answers ``G_e`` prompts × ``n`` samples = ``M_e`` responses; the step
has ``G = E·G_e`` prompts and ``N = G·n`` responses, group-major, engine-major.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from sophiavl_mcore.data.records import Record
from sophiavl_mcore.parallel.collectives import host_all_gather, host_all_gather_object
from sophiavl_mcore.rewards.stage import GroupScores
from sophiavl_mcore.rewards.trust_grpo import TrustGRPOResult
from sophiavl_mcore.rollout.exchange import TrainRow
from sophiavl_mcore.rollout.interface import RolloutResult
from sophiavl_mcore.rollout.layout import EngineLayout
from sophiavl_mcore.trainer.grpo.rollout_batch import RolloutBatch

if TYPE_CHECKING:
    from PIL import Image

    from sophiavl_mcore.data.images import ImageBatch

#: The task's true thinking quality of an engine's replies, f64 [M_e] (NaN = unknown).
QualityOracle = Callable[["EngineRollout"], np.ndarray]


@dataclasses.dataclass
class EngineRollout:
    """This rank's engine's share of the step.

    ``first_group``: index of ``records[0]`` in the step; ``results[g]`` is None for a
    prompt dropped before generation (its image could not be loaded); ``images``: the
    PIL image per prompt (or None).
    """

    first_group: int
    records: list[Record]
    results: list[RolloutResult | None]
    images: list[Image.Image | None]
    n: int

    def texts(self) -> list[list[str]]:
        return [[s.text for s in r.samples] if r is not None else [""] * self.n
                for r in self.results]

    @property
    def responses(self) -> list[list[dict[str, str]]]:
        """Texts per group as ``[{"text": …}]`` (what the task's thinking oracle reads)."""
        return [[{"text": t} for t in group] for group in self.texts()]

    def valid(self) -> np.ndarray:
        """bool [M_e]: responses that were really generated."""
        return np.repeat([r is not None for r in self.results], self.n)

    def train_rows(self, advantages: np.ndarray, pad_id: int) -> dict[int, TrainRow]:
        """This engine's responses as trainer rows, by global response index."""
        rows = {}
        for g, res in enumerate(self.results):
            for j in range(self.n):
                k = g * self.n + j
                gid = self.first_group + g
                if res is None:
                    empty = np.asarray([pad_id], np.int64)
                    rows[gid * self.n + j] = TrainRow(gid, empty, empty, np.zeros(1, np.float32), 0.0,
                                                      valid=False)
                    continue
                s = res.samples[j]
                rows[gid * self.n + j] = TrainRow(gid, res.prompt_token_ids, s.token_ids,
                                                  np.nan_to_num(s.logprobs), float(advantages[k]))
        return rows


# Per-response columns every rank gathers for metrics (float64).
RESPONSE_COLUMNS = ("valid", "outcome", "accuracy", "well_formed", "thinking", "reward",
                    "advantage", "length", "truncated", "answer", "true_quality")
GROUP_COLUMNS = ("gamma", "mu_correct", "mu_wrong", "skipped")


def answer_code(text: str) -> float:
    """A stable number per well-formed answer (−1 when the format gate fails), so that
    answer diversity can be counted from gathered floats."""
    from sophiavl_mcore.rewards.outcome import parse_response

    p = parse_response(text)
    return float(zlib.crc32(p.answer.strip().encode())) if p.well_formed else -1.0


def engine_columns(roll: EngineRollout, scores: GroupScores, oracle: QualityOracle | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(f64 [M_e, len(RESPONSE_COLUMNS)], f64 [G_e, len(GROUP_COLUMNS)]); ``oracle``: the
    task's true thinking quality of a rollout's replies (NaN column without one)."""
    lens, trunc, answers = [], [], []
    for res in roll.results:
        for j in range(roll.n):
            s = res.samples[j] if res is not None else None
            lens.append(len(s.token_ids) if s is not None else 0)
            trunc.append(float(s is not None and s.finish_reason == "length"))
            answers.append(answer_code(s.text) if s is not None else -1.0)
    resp = np.stack([roll.valid().astype(np.float64), scores.outcome, scores.accuracy,
                     scores.well_formed, scores.thinking, scores.trust.reward, scores.advantages,
                     np.asarray(lens, np.float64), np.asarray(trunc), np.asarray(answers),
                     oracle(roll) if oracle is not None else np.full(len(lens), np.nan)], axis=1)
    t = scores.trust
    skipped = np.zeros(len(t.gamma)) if t.skipped is None else np.asarray(t.skipped, np.float64)
    groups = np.stack([t.gamma, t.mu_correct, t.mu_wrong, skipped], axis=1)
    return resp, groups


@dataclasses.dataclass
class StepScalars:
    """The whole step's per-response and per-group scalars (every rank, same values);
    only generated responses/groups are kept."""

    records: list[Record]
    n: int
    columns: dict[str, np.ndarray]
    trust: TrustGRPOResult
    trm_metrics: dict[str, float]
    engine_responses: np.ndarray  # responses each engine generated [E]

    # attribute view for trainer.metrics.reward_metrics
    @property
    def outcome(self) -> np.ndarray:
        return self.columns["outcome"]

    @property
    def accuracy(self) -> np.ndarray:
        return self.columns["accuracy"]

    @property
    def well_formed(self) -> np.ndarray:
        return self.columns["well_formed"]

    @property
    def thinking(self) -> np.ndarray:
        return self.columns["thinking"]

    @property
    def true_quality(self) -> np.ndarray | None:
        """The task's true thinking quality per response (None: the task has none)."""
        q = self.columns["true_quality"]
        return q if np.isfinite(q).any() else None


def gather_scalars(layout: EngineLayout, records: Sequence[Record], roll: EngineRollout,
                   scores: GroupScores, oracle: QualityOracle | None = None) -> StepScalars:
    """Collective: every engine's scalar columns on every rank (leaders' copies)."""
    resp, groups = engine_columns(roll, scores, oracle)
    both = torch.from_numpy(np.concatenate([resp.reshape(-1), groups.reshape(-1)]))
    out = host_all_gather(both)
    metrics = host_all_gather_object(scores.trm_metrics)
    leaders = [layout.leader(e) for e in range(layout.num_engines)]
    split = resp.size
    all_resp = np.concatenate([out[r][:split].numpy().reshape(resp.shape) for r in leaders])
    all_groups = np.concatenate([out[r][split:].numpy().reshape(groups.shape) for r in leaders])
    keep = all_resp[:, 0] > 0
    per_engine = keep.reshape(len(leaders), -1).sum(axis=1)
    gkeep = keep.reshape(-1, roll.n).any(axis=1)
    columns = {c: all_resp[keep, i] for i, c in enumerate(RESPONSE_COLUMNS)}
    trust = TrustGRPOResult(reward=columns["reward"], gamma=all_groups[gkeep, 0],
                            mu_correct=all_groups[gkeep, 1], mu_wrong=all_groups[gkeep, 2],
                            annealing=scores.trust.annealing, num_groups=int(gkeep.sum()),
                            skipped=all_groups[gkeep, 3] > 0)
    kept_records = [r for r, k in zip(records, gkeep, strict=True) if k]
    return StepScalars(kept_records, roll.n, columns, trust,
                       _merge_trm([metrics[r] for r in leaders]), per_engine)


def is_counter(metric: str) -> bool:
    """TRM metrics that count (failures, requests sent): summed, not averaged."""
    return "fail" in metric or metric.endswith("_requests")


def _merge_trm(per_engine: Sequence[dict[str, float]]) -> dict[str, float]:
    """Counters (``*fail*``, ``*_requests``) add up over engines; the rest is averaged."""
    keys = sorted({k for m in per_engine for k in m})
    out = {}
    for k in keys:
        vals = [m[k] for m in per_engine if k in m]
        out[k] = float(np.sum(vals)) if is_counter(k) else float(np.mean(vals))
    return out


def rollout_metrics(s: StepScalars, layout: EngineLayout) -> dict[str, float]:
    """Response lengths (tokens), truncations, answer diversity, engines."""
    c = s.columns
    lens = c["length"]
    out = {"rollout/engines": float(layout.num_engines), "rollout/prompts": float(len(s.records)),
           "rollout/responses": float(lens.size),
           "rollout/engine_responses_min": float(s.engine_responses.min()),
           "rollout/engine_responses_max": float(s.engine_responses.max())}
    if lens.size:
        out.update({"rollout/response_len_mean": float(lens.mean()),
                    "rollout/response_len_std": float(lens.std()),
                    "rollout/response_len_min": float(lens.min()),
                    "rollout/response_len_max": float(lens.max()),
                    "rollout/truncated_frac": float(c["truncated"].mean())})
    answers = c["answer"].reshape(-1, s.n)
    formed = answers[answers >= 0]
    if formed.size:
        _, counts = np.unique(formed, return_counts=True)
        out["rollout/answer_top_frac"] = float(counts.max() / formed.size)
        out["rollout/answer_distinct"] = float(np.mean(
            [len(set(g[g >= 0].tolist())) for g in answers if (g >= 0).any()]))
    return out


def local_batch(rows: Sequence[TrainRow], records: Sequence[Record], images: ImageBatch,
                image_rows: dict[int, int], vision_ids: torch.Tensor, pad_id: int,
                biased_ids: Sequence[int] = ()) -> RolloutBatch:
    """This rank's DP share as a :class:`RolloutBatch`. ``images``: an
    :class:`~sophiavl_mcore.data.images.ImageBatch` holding the share's groups;
    ``image_rows[group]``: that group's index in it."""
    prompt_ids, response_ids, masks, lps, pvs, grids, groups, types, adv = ([] for _ in range(9))
    per_group: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}  # one tensor object per group's image
    for row in rows:
        rid = torch.from_numpy(np.asarray(row.response_ids, np.int64))
        # A sampled vision token would read as an image slot without an image (M-RoPE /
        # vision merge): feed a pad there and leave it out of the loss.
        bad = torch.isin(rid, vision_ids)
        if rid.numel() == 0:  # an empty reply still needs one scored position
            rid, bad = torch.tensor([pad_id]), torch.tensor([True])
        prompt_ids.append(torch.from_numpy(np.asarray(row.prompt_ids, np.int64)))
        response_ids.append(torch.where(bad, pad_id, rid))
        masks.append(~bad if row.valid else torch.zeros_like(bad))
        lp = np.asarray(row.logprobs, np.float32)
        lps.append(torch.from_numpy(lp if lp.size == rid.numel() else np.zeros(rid.numel(), np.float32)))
        if row.group not in per_group:
            per_group[row.group] = _group_image(images, image_rows.get(row.group) if row.valid else None)
        pvs.append(per_group[row.group][0])
        grids.append(per_group[row.group][1])
        groups.append(row.group)
        types.append(records[row.group].problem_type)
        adv.append(row.advantage)
    return RolloutBatch(prompt_ids, response_ids, torch.tensor(adv, dtype=torch.float32),
                        torch.tensor(groups), types, response_mask=masks, rollout_logprobs=lps,
                        pixel_values=pvs, image_grid_thw=grids, pad_id=pad_id,
                        biased_ids=tuple(int(i) for i in biased_ids))


def _group_image(images: ImageBatch, i: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    row = images.image_index[i] if i is not None else None
    if row is None:
        return None, None
    return (images.pixel_values[images.patch_slice(i)].clone(),
            images.image_grid_thw[row:row + 1].clone())


@dataclasses.dataclass
class SampleView:
    """The first group of this rank's engine in the shape
    :func:`~sophiavl_mcore.trainer.grpo.metrics.log_step` shows (text + image)."""

    records: list[Record]
    responses: list[list[dict[str, str]]]
    outcome: np.ndarray
    thinking: np.ndarray
    images: list[Image.Image | None]

    @classmethod
    def of(cls, roll: EngineRollout, scores: GroupScores) -> SampleView:
        first = next((g for g, r in enumerate(roll.results) if r is not None), None)
        if first is None:
            return cls([], [], np.zeros(0), np.zeros(0), [])
        k = slice(first * roll.n, (first + 1) * roll.n)
        texts = [{"text": s.text} for s in roll.results[first].samples]
        return cls([roll.records[first]], [texts], scores.outcome[k], scores.thinking[k],
                   [roll.images[first]])
