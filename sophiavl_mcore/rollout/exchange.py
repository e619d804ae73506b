"""From the rollout engines' layout to the trainer's data-parallel layout, as tensors.

Engine ``e`` holds the responses ``layout.response_range(e)`` of the step (group-major
order, every member of the engine the same rows); data-parallel rank ``d`` trains on the
contiguous share ``[d·N/DP, (d+1)·N/DP)``. :func:`plan_transfers` says, for every rank,
which engine member sends it which responses (a rank inside the producing engine copies
its own rows; otherwise the engine's members take turns as senders so that no one rank
serves everybody), and :func:`redistribute` moves them with gloo/NCCL point-to-point
messages of two flat tensors (int64 ids, float32 values) — no pickled objects, and no
rank ever holds more responses than its engine produced plus its own share.

Wire format of one message (a :class:`~sophiavl_mcore.rollout.batch.StepBatch` slice of
``g`` groups and ``k`` rows; each group's prompt travels once):
    ints   int64 [4 + 2g + 2k + ΣP + ΣR]: g, k, ΣP, ΣR, then (group id, P_g) per group
                                         (id −1−gid for a group not generated), then
                                         (group_of, R_i) per row, then prompt ids, then
                                         response ids
    floats fp32  [k + ΣR]:               advantages, then per-token engine log-probs
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from sophiavl_mcore.data.records import Record
from sophiavl_mcore.parallel.collectives import host_all_gather
from sophiavl_mcore.parallel.host import host_group
from sophiavl_mcore.rollout.batch import StepBatch
from sophiavl_mcore.rollout.layout import EngineLayout


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Rows ``[start, stop)`` (global response indices) from ``src`` to ``dst``."""

    src: int
    dst: int
    start: int
    stop: int


def dp_share(total: int, dp: int, dp_rank: int) -> range:
    per = total // dp
    return range(dp_rank * per, (dp_rank + 1) * per)


def plan_transfers(layout: EngineLayout, dp_ranks: Sequence[int], dp: int) -> list[Transfer]:
    """Every (sender, receiver, rows) of the step; ``dp_ranks[r]``: rank r's DP rank.

    Deterministic, so every rank computes the same plan without talking.
    """
    total = layout.prompts * layout.n
    out = []
    for dst, d in enumerate(dp_ranks):
        need = dp_share(total, dp, d)
        for e in range(layout.num_engines):
            have = layout.response_range(e)
            start, stop = max(need.start, have.start), min(need.stop, have.stop)
            if start >= stop:
                continue
            members = layout.ranks_of(e)
            src = dst if dst in members else members[dst % len(members)]
            out.append(Transfer(src, dst, start, stop))
    return out


def pack(part: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's rows → (int64, float32) flat tensors (see the module docstring)."""
    prompts = [np.asarray(p, dtype=np.int64) for p in part.prompt_ids]
    responses = [np.asarray(r, dtype=np.int64) for r in part.response_ids]
    generated = part.group_columns["generated"] > 0
    gid = np.where(generated, part.group_id, -1 - part.group_id)
    head = [part.num_groups, len(part), sum(map(len, prompts)), sum(map(len, responses))]
    per_group = np.stack([gid, [len(p) for p in prompts]], axis=1).reshape(-1)
    per_row = np.stack([part.group_of, [len(r) for r in responses]], axis=1).reshape(-1)
    ints = np.concatenate([np.asarray(head, np.int64), per_group, per_row, *prompts, *responses])
    floats = np.concatenate([np.asarray(part.columns["advantage"], np.float32),
                             *[np.asarray(lp, np.float32) for lp in part.logprobs]])
    return torch.from_numpy(ints.astype(np.int64)), torch.from_numpy(floats)


def unpack(ints: torch.Tensor, floats: torch.Tensor, records: Sequence[Record], n: int) -> StepBatch:
    """The inverse of :func:`pack`; ``records``: the step's, by group index."""
    a, f = ints.numpy(), floats.numpy()
    g, m = int(a[0]), int(a[1])
    per_group = a[4:4 + 2 * g].reshape(g, 2)
    per_row = a[4 + 2 * g:4 + 2 * g + 2 * m].reshape(m, 2)
    bounds = np.cumsum(np.concatenate([[4 + 2 * g + 2 * m], per_group[:, 1], per_row[:, 1]]))
    pieces = [a[s:e].copy() for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    fb = np.cumsum(np.concatenate([[m], per_row[:, 1]]))
    generated = per_group[:, 0] >= 0
    gid = np.where(generated, per_group[:, 0], -1 - per_group[:, 0])
    return StepBatch(n, [records[i] for i in gid.tolist()], gid, per_row[:, 0],
                     group_columns={"generated": generated.astype(np.float64)},
                     columns={"advantage": f[:m].astype(np.float64)},
                     prompt_ids=pieces[:g], response_ids=pieces[g:],
                     logprobs=[f[s:e].copy() for s, e in zip(fb[:-1], fb[1:], strict=True)])


def redistribute(mine: StepBatch, first: int, plan: Sequence[Transfer], rank: int,
                 records: Sequence[Record]) -> tuple[list[int], StepBatch, int]:
    """Collective over the ranks in ``plan``: send the rows this rank serves, receive
    its share. ``mine``: this rank's engine batch, whose row 0 is the step's response
    ``first``; ``records``: the step's, by group index. Returns (the global indices of
    this rank's rows, its share as one batch in that order, bytes received)."""
    def rows(t: Transfer) -> StepBatch:
        return mine.select(range(t.start - first, t.stop - first))

    outgoing = [t for t in plan if t.src == rank and t.dst != rank]
    incoming = [t for t in plan if t.dst == rank and t.src != rank]
    payloads = {t: pack(rows(t)) for t in outgoing}
    sizes_out = {t: torch.tensor([payloads[t][0].numel(), payloads[t][1].numel()]) for t in outgoing}
    sizes_in = {t: torch.zeros(2, dtype=torch.int64) for t in incoming}
    _exchange(sizes_out, sizes_in, rank)
    bufs_in = {t: (torch.empty(int(sizes_in[t][0]), dtype=torch.int64),
                   torch.empty(int(sizes_in[t][1]), dtype=torch.float32)) for t in incoming}
    for part in (0, 1):
        _exchange({t: payloads[t][part] for t in outgoing},
                  {t: bufs_in[t][part] for t in incoming}, rank)
    parts: list[tuple[Transfer, StepBatch]] = []
    received = 0
    for t in (t for t in plan if t.dst == rank):
        if t.src == rank:
            parts.append((t, rows(t)))
            continue
        ints, floats = bufs_in[t]
        received += ints.numel() * 8 + floats.numel() * 4
        parts.append((t, unpack(ints, floats, records, mine.n)))
    parts.sort(key=lambda p: p[0].start)
    index = [i for t, _ in parts for i in range(t.start, t.stop)]
    share = StepBatch.concat([p for _, p in parts]) if parts else mine.select([])
    return index, share, received


def gather_engines(layout: EngineLayout, t: torch.Tensor) -> list[torch.Tensor]:
    """Collective: every engine's copy of ``t`` (same shape everywhere; the members of
    an engine hold the same values), one per engine, from its leader."""
    out = host_all_gather(t)
    return [out[layout.leader(e)] for e in range(layout.num_engines)]


def _exchange(out: Mapping[Transfer, torch.Tensor], into: Mapping[Transfer, torch.Tensor],
              rank: int) -> None:
    group = host_group()
    work = [dist.isend(tensor, dst=t.dst, group=group) for t, tensor in out.items()]
    work += [dist.irecv(tensor, src=t.src, group=group) for t, tensor in into.items()]
    for w in work:
        w.wait()
