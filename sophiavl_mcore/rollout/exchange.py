"""From the rollout engines' layout to the trainer's data-parallel layout, as tensors.

Engine ``e`` holds the responses ``layout.response_range(e)`` of the step (group-major
order, every member of the engine the same rows); data-parallel rank ``d`` trains on the
contiguous share ``[d·N/DP, (d+1)·N/DP)``. :func:`plan_transfers` says, for every rank,
which engine member sends it which responses (a rank inside the producing engine copies
its own rows; otherwise the engine's members take turns as senders so that no one rank
serves everybody), and :func:`redistribute` moves them with gloo/NCCL point-to-point
messages of two flat tensors (int64 ids, float32 values) — no pickled objects, and no
rank ever holds more responses than its engine produced plus its own share.

Wire format of one message (``k`` rows):
    ints   int64 [3 + 3k + ΣP + ΣR]: k, ΣP, ΣR, then (group, P_i, R_i) per row, then
                                      prompt ids, then response ids
    floats fp32  [k + ΣR]:            advantages, then per-token log-probs
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

from sophiavl_mcore.parallel.host import host_group
from sophiavl_mcore.rollout.layout import EngineLayout


@dataclasses.dataclass
class TrainRow:
    """What the trainer needs of one response.

    ``group``: index of its prompt in the step; ``prompt_ids`` int64 [P] (image
    placeholders expanded); ``response_ids`` int64 [R]; ``logprobs`` fp32 [R] (the
    engine's); ``advantage``: its group advantage; ``valid``: False for the rows of a
    prompt dropped before generation (a bad image) — trained with an all-False mask.
    """

    group: int
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    logprobs: np.ndarray
    advantage: float
    valid: bool = True


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


def pack(rows: Sequence[TrainRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows → (int64, float32) flat tensors (see the module docstring)."""
    p = [np.asarray(r.prompt_ids, dtype=np.int64) for r in rows]
    s = [np.asarray(r.response_ids, dtype=np.int64) for r in rows]
    head = [len(rows), sum(map(len, p)), sum(map(len, s))]
    meta = [v for r, pi, si in zip(rows, p, s, strict=True)
            for v in (r.group if r.valid else -1 - r.group, len(pi), len(si))]
    ints = np.concatenate([np.asarray(head + meta, dtype=np.int64), *p, *s])
    floats = np.concatenate([np.asarray([r.advantage for r in rows], dtype=np.float32),
                             *[np.asarray(r.logprobs, dtype=np.float32) for r in rows]])
    return torch.from_numpy(ints), torch.from_numpy(floats)


def unpack(ints: torch.Tensor, floats: torch.Tensor) -> list[TrainRow]:
    a, f = ints.numpy(), floats.numpy()
    k = int(a[0])
    meta = a[3:3 + 3 * k].reshape(k, 3)
    pos, fpos = 3 + 3 * k, k
    prompts = []
    for _, plen, _ in meta:
        prompts.append(a[pos:pos + plen].copy())
        pos += plen
    rows = []
    for i, (g, _, rlen) in enumerate(meta):
        resp = a[pos:pos + rlen].copy()
        pos += rlen
        lps = f[fpos:fpos + rlen].copy()
        fpos += rlen
        valid = bool(g >= 0)
        rows.append(TrainRow(int(g) if valid else int(-1 - g), prompts[i], resp, lps,
                             float(f[i]), valid))
    return rows


def redistribute(mine: Mapping[int, TrainRow], plan: Sequence[Transfer], rank: int
                 ) -> tuple[list[int], list[TrainRow], int]:
    """Collective over the ranks in ``plan``: send the rows this rank serves, receive
    its share. ``mine``: this rank's engine rows by global index. Returns (the global
    indices of this rank's rows, the rows in that order, bytes received)."""
    outgoing = [t for t in plan if t.src == rank and t.dst != rank]
    incoming = [t for t in plan if t.dst == rank and t.src != rank]
    payloads = {t: pack([mine[i] for i in range(t.start, t.stop)]) for t in outgoing}
    sizes_out = {t: torch.tensor([payloads[t][0].numel(), payloads[t][1].numel()]) for t in outgoing}
    sizes_in = {t: torch.zeros(2, dtype=torch.int64) for t in incoming}
    _exchange(sizes_out, sizes_in, rank)
    bufs_in = {t: (torch.empty(int(sizes_in[t][0]), dtype=torch.int64),
                   torch.empty(int(sizes_in[t][1]), dtype=torch.float32)) for t in incoming}
    for part in (0, 1):
        _exchange({t: payloads[t][part] for t in outgoing},
                  {t: bufs_in[t][part] for t in incoming}, rank)
    rows: dict[int, TrainRow] = {}
    received = 0
    for t in plan:
        if t.dst != rank:
            continue
        if t.src == rank:
            rows.update({i: mine[i] for i in range(t.start, t.stop)})
            continue
        ints, floats = bufs_in[t]
        received += ints.numel() * 8 + floats.numel() * 4
        rows.update(zip(range(t.start, t.stop), unpack(ints, floats), strict=True))
    order = sorted(rows)
    return order, [rows[i] for i in order], received


def _exchange(out: Mapping[Transfer, torch.Tensor], into: Mapping[Transfer, torch.Tensor],
              rank: int) -> None:
    group = host_group()
    work = [dist.isend(tensor, dst=t.dst, group=group) for t, tensor in out.items()]
    work += [dist.irecv(tensor, src=t.src, group=group) for t, tensor in into.items()]
    for w in work:
        w.wait()
