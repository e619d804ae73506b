"""Who sends which Megatron shard, in which bucket: pure arithmetic over a conversion plan.

Every rank computes the same schedule from the same inputs (the plan, the rank table
and every rank's tensor dtypes), so senders and the receiver agree on message order
and sizes without exchanging them at sync time.

A *piece* is one TP rank's tensor of one rule (``replicated`` rules have a single piece,
taken from TP rank 0). Pieces come from data-parallel replica 0 of each (PP stage, TP
rank); other DP replicas hold identical weights and send nothing. A *bucket* is a run
of consecutive rules whose pieces total at most ``bucket_bytes`` (a larger rule gets a
bucket of its own). Rules keep plan order (stage by stage, layer by layer), so the
engine receives each layer's tensors together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from sophiavl_mcore.checkpoint.mapping import ConversionPlan, Rule


@dataclasses.dataclass(frozen=True)
class RankCoord:
    """A trainer rank's place in the layout (global rank; TP, PP, DP indices)."""

    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int


@dataclasses.dataclass(frozen=True)
class Piece:
    """One TP rank's tensor of ``rule`` (shape per TP rank), sent by global rank ``src``."""

    rule: Rule
    tp_rank: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    src: int

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclasses.dataclass
class Bucket:
    """Consecutive rules and their pieces; ``nbytes`` = sum of piece sizes (bytes)."""

    rules: list[Rule]
    pieces: list[Piece]
    nbytes: int = 0

    def pieces_from(self, src: int, dtype: torch.dtype | None = None) -> list[Piece]:
        """Pieces sent by ``src`` (optionally of one dtype), in schedule order."""
        return [p for p in self.pieces if p.src == src and (dtype is None or p.dtype == dtype)]

    def senders(self) -> list[tuple[int, torch.dtype]]:
        """(source rank, dtype) message keys in a fixed order (rank, then dtype name)."""
        keys = {(p.src, p.dtype) for p in self.pieces}
        return sorted(keys, key=lambda k: (k[0], str(k[1])))


def source_table(coords: Sequence[RankCoord], tp: int, pp: int) -> dict[tuple[int, int], int]:
    """``{(pp_rank, tp_rank): global rank}`` of DP replica 0; checks the table is complete."""
    table: dict[tuple[int, int], int] = {}
    for c in coords:
        if c.dp_rank == 0:
            key = (c.pp_rank, c.tp_rank)
            if key in table:
                raise ValueError(f"two ranks ({table[key]}, {c.rank}) claim pp={key[0]} tp={key[1]} dp=0")
            table[key] = c.rank
    missing = [(s, t) for s in range(pp) for t in range(tp) if (s, t) not in table]
    if missing:
        raise ValueError(f"no rank holds (pp_rank, tp_rank) {missing} at dp_rank 0 (tp={tp}, pp={pp})")
    return table


def rule_pieces(
    plan: ConversionPlan,
    rule: Rule,
    dtype: torch.dtype,
    sources: Mapping[tuple[int, int], int],
) -> list[Piece]:
    """The pieces of one rule (one per TP rank; one for ``replicated``)."""
    shape = tuple(plan.rank_shape(rule))
    ranks = [0] if rule.kind == "replicated" else list(range(plan.tp))
    return [Piece(rule, t, shape, dtype, sources[(rule.stage, t)]) for t in ranks]


def build_buckets(
    plan: ConversionPlan,
    dtypes: Mapping[tuple[int, str], torch.dtype],
    sources: Mapping[tuple[int, int], int],
    bucket_bytes: int,
) -> list[Bucket]:
    """Split every non-mirror rule of ``plan`` into size-bounded buckets.

    Args:
        dtypes: ``{(stage, megatron name): dtype}`` of the trainer's tensors.
        sources: from :func:`source_table`.
        bucket_bytes: bound on the pieces of one bucket (bytes).
    """
    buckets: list[Bucket] = []
    current = Bucket([], [])
    for rule in plan.rules:
        if rule.mirror:  # the tied head's copy on the last stage: the engine needs it once
            continue
        pieces = rule_pieces(plan, rule, dtypes[(rule.stage, rule.mcore)], sources)
        size = sum(p.nbytes for p in pieces)
        if current.rules and current.nbytes + size > bucket_bytes:
            buckets.append(current)
            current = Bucket([], [])
        current.rules.append(rule)
        current.pieces.extend(pieces)
        current.nbytes += size
    if current.rules:
        buckets.append(current)
    return buckets


def hf_nbytes(rule: Rule, dtype: torch.dtype) -> int:
    """Bytes of the full HF tensor(s) of ``rule`` in ``dtype``."""
    return sum(torch.Size(s).numel() for s in rule.hf_shapes) * dtype.itemsize
