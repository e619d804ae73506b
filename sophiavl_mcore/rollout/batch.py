"""The step batch: one columnar, group-major type from the rollout engines to the loss.

An engine's rollout fills it (tokens, texts, engine log-probs), the reward stage adds
columns (R^o, R^t, final reward, advantage per response; γ, μc, μw per group), the
exchange moves slices of it between ranks as two flat tensors, and the trainer turns its
data-parallel share into model inputs. Every rank also holds the whole step's scalar
columns (no tokens) for metrics.

Shapes: ``G`` groups (prompts) and ``M`` responses; response ``k`` belongs to group
``group_of[k]`` (an index into the per-group fields). An engine's batch is group-major
with ``n`` responses per group (``group_of = [0]*n + [1]*n + …``); a data-parallel
share may hold part of a group.

    per group [G]     records, group_id (int64: the group's index in the step),
                      images (PIL or None), prompt_ids (int64 [P_g]),
                      group_columns[name] (f64): "generated" (1 = sampled, 0 = dropped
                      before generation, e.g. a bad image), then γ, μc, μw, skipped
    per response [M]  group_of (int64), response_ids (int64 [R_k]), logprobs
                      (fp32 [R_k], the engine's), texts,
                      columns[name] (f64): "length", "truncated", then outcome,
                      accuracy, well_formed, thinking (NaN = not scored), reward,
                      advantage, …
    per batch         n (samples per prompt), scalars (annealing, TRM counters)

``response_ids``/``logprobs``/``texts``/``images``/``prompt_ids`` are None where a batch
carries columns only (the step's metrics view).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sophiavl_mcore.data.records import Record

__all__ = ["StepBatch", "is_counter"]


def is_counter(metric: str) -> bool:
    """Scalars that count (TRM failures, requests sent): summed when batches meet."""
    return "fail" in metric or metric.endswith("_requests")


def _check_sizes(per: str, expected: int, fields: dict[str, Any]) -> None:
    wrong = [f"{name} has {len(v)} entries" for name, v in fields.items()
             if v is not None and len(v) != expected]
    if wrong:
        raise ValueError(f"StepBatch: {'; '.join(wrong)}, expected one per {per} ({expected})")


def _take(values: list[Any] | None, idx: Sequence[int]) -> list[Any] | None:
    return None if values is None else [values[i] for i in idx]


def _join(parts: Sequence[list[Any] | None]) -> list[Any] | None:
    return None if any(p is None for p in parts) else [v for p in parts for v in p]


@dataclasses.dataclass
class StepBatch:
    """Groups and their responses, columnar (see the module docstring for the fields)."""

    n: int
    records: list[Record]
    group_id: np.ndarray
    group_of: np.ndarray
    group_columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    columns: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    images: list[Any] | None = None
    prompt_ids: list[np.ndarray] | None = None
    response_ids: list[np.ndarray] | None = None
    logprobs: list[np.ndarray] | None = None
    texts: list[str] | None = None
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.group_id = np.asarray(self.group_id, dtype=np.int64).reshape(-1)
        self.group_of = np.asarray(self.group_of, dtype=np.int64).reshape(-1)
        g, m = len(self.records), self.group_of.size
        _check_sizes("group", g, {"group_id": self.group_id, "images": self.images,
                                  "prompt_ids": self.prompt_ids, **self.group_columns})
        _check_sizes("response", m, {"response_ids": self.response_ids, "logprobs": self.logprobs,
                                     "texts": self.texts, **self.columns})
        if m and (self.group_of.min() < 0 or self.group_of.max() >= g):
            raise ValueError(f"StepBatch.group_of holds {self.group_of.min()}..{self.group_of.max()}, "
                             f"expected indices into the {g} groups")

    # -- building --------------------------------------------------------------------

    @classmethod
    def grouped(cls, n: int, records: list[Record], group_id: Sequence[int], **fields: Any
                ) -> StepBatch:
        """A group-major batch of ``len(records)`` groups × ``n`` responses."""
        return cls(n, records, np.asarray(group_id), np.repeat(np.arange(len(records)), n), **fields)

    # -- sizes and views -------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.group_of.size)

    @property
    def num_groups(self) -> int:
        return len(self.records)

    @property
    def generated(self) -> np.ndarray:
        """bool [M]: responses that were really sampled (their group was generated)."""
        return self.group_columns["generated"][self.group_of] > 0

    @property
    def responses(self) -> list[list[dict[str, str]]]:
        """Texts per group as ``[{"text": …}]`` (what a task's thinking oracle reads)."""
        return [[{"text": t} for t in group] for group in self.texts_by_group()]

    def texts_by_group(self) -> list[list[str]]:
        """``texts`` per group, in response order (needs ``texts``)."""
        if self.texts is None:
            raise ValueError("StepBatch has no texts (a metrics view carries columns only)")
        out: list[list[str]] = [[] for _ in self.records]
        for g, t in zip(self.group_of.tolist(), self.texts, strict=True):
            out[g].append(t)
        return out

    def add_columns(self, **columns: np.ndarray) -> None:
        """Per-response columns f64 [M] (the reward stage's)."""
        for name, v in columns.items():
            v = np.asarray(v, dtype=np.float64).reshape(-1)
            if v.size != len(self):
                raise ValueError(f"StepBatch column {name!r} has {v.size} values, expected {len(self)}")
            self.columns[name] = v

    def add_group_columns(self, **columns: np.ndarray) -> None:
        """Per-group columns f64 [G]."""
        for name, v in columns.items():
            v = np.asarray(v, dtype=np.float64).reshape(-1)
            if v.size != self.num_groups:
                raise ValueError(f"StepBatch group column {name!r} has {v.size} values, "
                                 f"expected {self.num_groups}")
            self.group_columns[name] = v

    # -- subsets ---------------------------------------------------------------------

    def select(self, responses: Sequence[int]) -> StepBatch:
        """The responses at ``responses`` (in that order) and the groups they belong to
        (in order of first appearance)."""
        idx = np.asarray(list(responses), dtype=np.int64)
        of = self.group_of[idx]
        groups, first = np.unique(of, return_index=True)
        groups = groups[np.argsort(first)]
        remap = np.full(self.num_groups, -1, dtype=np.int64)
        remap[groups] = np.arange(groups.size)
        g, r = groups.tolist(), idx.tolist()
        return StepBatch(
            self.n, [self.records[i] for i in g], self.group_id[groups], remap[of],
            {k: v[groups] for k, v in self.group_columns.items()},
            {k: v[idx] for k, v in self.columns.items()},
            _take(self.images, g), _take(self.prompt_ids, g), _take(self.response_ids, r),
            _take(self.logprobs, r), _take(self.texts, r), dict(self.scalars))

    def select_groups(self, groups: Sequence[int]) -> StepBatch:
        """The ``groups`` (indices into this batch) with all their responses, in order."""
        order = [int(k) for g in groups for k in np.flatnonzero(self.group_of == g)]
        out = self.select(order)
        if len(out.records) < len(groups):  # a group without responses is still a group
            raise ValueError(f"StepBatch.select_groups: some of groups {list(groups)} have no "
                             "responses")
        return out

    @classmethod
    def concat(cls, parts: Sequence[StepBatch]) -> StepBatch:
        """The parts one after another (scalars: counters summed, the rest the last part's)."""
        if not parts:
            raise ValueError("StepBatch.concat needs at least one part")
        offsets = np.cumsum([0] + [p.num_groups for p in parts[:-1]])
        scalars: dict[str, float] = {}
        for p in parts:
            for k, v in p.scalars.items():
                scalars[k] = scalars.get(k, 0.0) + v if is_counter(k) else v

        def cat(name: str) -> dict[str, np.ndarray]:  # the columns every part has
            common = set.intersection(*(set(getattr(p, name)) for p in parts))
            return {k: np.concatenate([getattr(p, name)[k] for p in parts]) for k in sorted(common)}

        return cls(parts[0].n, [r for p in parts for r in p.records],
                   np.concatenate([p.group_id for p in parts]),
                   np.concatenate([p.group_of + o for p, o in zip(parts, offsets, strict=True)]),
                   cat("group_columns"), cat("columns"),
                   _join([p.images for p in parts]), _join([p.prompt_ids for p in parts]),
                   _join([p.response_ids for p in parts]), _join([p.logprobs for p in parts]),
                   _join([p.texts for p in parts]), scalars)
