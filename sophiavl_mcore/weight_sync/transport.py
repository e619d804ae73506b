"""How one bucket's Megatron pieces reach the ranks that hold engines.

Two transports, chosen by :class:`~sophiavl_mcore.weight_sync.megatron_sync.MegatronWeightSync`
from its ``engine_ranks``:

- :class:`ReplicaBroadcast` (every rank holds an engine shard, the training case): each
  TP-split piece (one Megatron tensor of one (PP stage, TP rank)) is broadcast inside
  the receiver's own *model-parallel group* (the TP × PP ranks of its data-parallel
  replica) from the replica member that owns it; a TP-replicated tensor (norms, biases
  of row-parallel layers, a replicated vision tower) travels only along the pipeline
  group, from the same TP rank of its stage. A rank receives exactly what its replica
  holds elsewhere and never anything from another replica::

      trainer TP=2, PP=1:   ≈ model_bytes / 2 per rank
      trainer TP=1, DP=4:   0 bytes (every rank already holds the whole model)
      trainer TP=2, PP=2:   ≈ 3/4 · model_bytes (the other stage's layers)

- :class:`PointToPoint` (one rank holds the engine): the data-parallel-replica-0 rank of
  each (PP stage, TP rank) packs its pieces of the bucket into one flat buffer per dtype
  and sends it to the engine rank, which receives them in the schedule's sender order.

Both return the same thing on a receiving rank: ``{(stage, megatron name, tp_rank):
piece}`` for every piece of the bucket. ``sent`` / ``received`` count payload bytes
(this rank's outgoing buffers; what reached it from other ranks) since the last
:meth:`reset`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from sophiavl_mcore.weight_sync.schedule import Bucket, Piece, RankCoord

PieceKey = tuple[int, str, int]  # (PP stage, Megatron name, TP rank)


def local_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's Megatron tensors by state-dict name (extra states left out)."""
    return {k: v for k, v in module.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def _numel(pieces: Sequence[Piece]) -> int:
    return sum(torch.Size(p.shape).numel() for p in pieces)


def _pack(pieces: Sequence[Piece], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """This rank's ``pieces`` as one flat buffer [sum of numels]."""
    return torch.cat([tensors[p.rule.mcore].detach().reshape(-1) for p in pieces])


def _unpack(flat: torch.Tensor, pieces: Sequence[Piece], out: dict[PieceKey, torch.Tensor]) -> None:
    """Views of the flat buffer [sum of numels] as each piece's shape, into ``out``."""
    offset = 0
    for p in pieces:
        n = torch.Size(p.shape).numel()
        out[(p.rule.stage, p.rule.mcore, p.tp_rank)] = flat[offset:offset + n].view(p.shape)
        offset += n


class _Counted:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0

    def reset(self) -> None:
        self.sent = self.received = 0


class PointToPoint(_Counted):
    """Every piece to one engine rank (gloo / NCCL point-to-point, schedule order)."""

    def __init__(self, rank: int, engine_rank: int, device: torch.device) -> None:
        super().__init__()
        self.rank = rank
        self.engine_rank = engine_rank
        self.device = device

    def send(self, buckets: Sequence[Bucket], tensors: Mapping[str, torch.Tensor]) -> None:
        """A non-engine rank's side of a whole sync: its pieces of every bucket."""
        for bucket in buckets:
            for src, dtype in bucket.senders():
                if src != self.rank:
                    continue
                flat = _pack(bucket.pieces_from(src, dtype), tensors)
                dist.send(flat, dst=self.engine_rank)
                self.sent += flat.numel() * flat.element_size()
                del flat

    def collect(self, bucket: Bucket, tensors: Mapping[str, torch.Tensor]) -> dict[PieceKey, torch.Tensor]:
        """Every piece of ``bucket`` on the engine rank (its own pieces without a copy)."""
        parts: dict[PieceKey, torch.Tensor] = {}
        for src, dtype in bucket.senders():
            pieces = bucket.pieces_from(src, dtype)
            if src == self.rank:
                for p in pieces:
                    parts[(p.rule.stage, p.rule.mcore, p.tp_rank)] = tensors[p.rule.mcore].detach()
                continue
            buf = torch.empty(_numel(pieces), dtype=dtype, device=self.device)
            dist.recv(buf, src=src)
            self.received += buf.numel() * buf.element_size()
            _unpack(buf, pieces, parts)
        return parts


class ReplicaBroadcast(_Counted):
    """Every piece to every rank of its data-parallel replica (broadcasts inside the
    replica's model-parallel group; TP-replicated pieces along the pipeline group).

    Args:
        coord: this rank's place; coords: every rank's, by global rank.
        tp, pp: trainer TP / PP sizes; mp_group, pp_group: this rank's Megatron
            model-parallel and pipeline groups.
    """

    def __init__(self, coord: RankCoord, coords: Sequence[RankCoord], tp: int, pp: int,
                 mp_group: Any, pp_group: Any, device: torch.device) -> None:
        super().__init__()
        self.coord, self.coords = coord, list(coords)
        self.tp, self.pp = tp, pp
        self.mp_group, self.pp_group = mp_group, pp_group
        self.device = device
        # (pp, tp, dp) → global rank: a piece's owner inside this rank's replica
        self._owner = {(c.pp_rank, c.tp_rank, c.dp_rank): c.rank for c in coords}

    def send(self, buckets: Sequence[Bucket], tensors: Mapping[str, torch.Tensor]) -> None:
        raise RuntimeError("every rank holds an engine: no rank only sends")

    def owner_of(self, src: int, replicated: bool) -> int:
        """Who in this rank's replica holds the pieces the schedule files under ``src``
        (the replica-0 owner of a (stage, TP rank)); a TP-replicated tensor is held by
        every TP rank of its stage, so this rank's own TP rank there serves it."""
        c = self.coords[src]
        tp_rank = self.coord.tp_rank if replicated else c.tp_rank
        return self._owner[(c.pp_rank, tp_rank, self.coord.dp_rank)]

    def collect(self, bucket: Bucket, tensors: Mapping[str, torch.Tensor]) -> dict[PieceKey, torch.Tensor]:
        """Every piece of ``bucket`` on this rank; no rank receives a tensor it holds."""
        parts: dict[PieceKey, torch.Tensor] = {}
        for src, dtype in bucket.senders():
            for replicated in (False, True):
                pieces = [p for p in bucket.pieces_from(src, dtype)
                          if (p.rule.kind == "replicated") == replicated]
                if not pieces:
                    continue
                owner = self.owner_of(src, replicated)
                group, size = ((self.pp_group, self.pp) if replicated
                               else (self.mp_group, self.tp * self.pp))
                if owner == self.coord.rank:
                    flat = _pack(pieces, tensors)
                else:
                    flat = torch.empty(_numel(pieces), dtype=dtype, device=self.device)
                if size > 1:
                    dist.broadcast(flat, src=owner, group=group)
                    nbytes = flat.numel() * flat.element_size()
                    if owner == self.coord.rank:
                        self.sent += nbytes
                    else:
                        self.received += nbytes
                _unpack(flat, pieces, parts)
        return parts
