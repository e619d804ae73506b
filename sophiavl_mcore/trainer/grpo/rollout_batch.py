"""The rollout batch the GRPO trainer consumes, and its micro-batch layout.

A :class:`RolloutBatch` holds N sampled responses (one data-parallel rank's share of a
step, or the whole step before :meth:`RolloutBatch.shard`), each with its own prompt:

    prompt_ids[i]        int64 [P_i]   prompt tokens, image placeholders already expanded
    response_ids[i]      int64 [R_i]   sampled tokens (R_i >= 1; EOS included if sampled)
    response_mask[i]     bool  [R_i]   tokens that enter the loss (e.g. False after a
                                       truncation or on tool output); default all True
    advantages           fp32  [N]     GRPO advantages (one per response)
    group_ids            int64 [N]     prompt group of each response
    problem_types        N strings     for per-type metrics
    rollout_logprobs[i]  fp32  [R_i]   log-probs vLLM reported while sampling (optional)
    pixel_values[i]      fp32  [patches, 3·2·14·14] or None   (the same tensor object may
    image_grid_thw[i]    int64 [images, 3] or None             be shared by a group)
    position_ids[i]      int64 [3, P_i + R_i]  M-RoPE positions, filled by
                                       :meth:`RolloutBatch.ensure_position_ids` (the model
                                       computes them once; every pass reuses them)
    old_logprobs[i]      fp32  [R_i]   trainer log-probs before the update (set by the loop)
    ref_logprobs[i]      fp32  [R_i]   frozen reference log-probs (set by the loop)
    biased_ids                         token ids sampled with vLLM's logit bias (−100)

**Micro-batch layout (right padding, no packing).** :meth:`RolloutBatch.micro_batches`
sorts the responses by total length and cuts them into micro-batches of
``micro_batch_size``; each micro-batch is right-padded to its own longest sequence
(rounded up to ``pad_to_multiple_of``) by :func:`sophiavl_mcore.trainer.collate.collate`, the
SFT trainer's collation (same ``labels`` = inputs shifted left). Sorting keeps the
padding small without packing. Packing (THD layout with ``cu_seqlens``) would remove the
rest, but Megatron's local (CPU) attention has no packed-sequence path and the vision
placeholder / M-RoPE bookkeeping would have to be redone per pack; with causal attention
right padding needs no attention mask at all (a real token never attends to a later pad).

The model's output at position t predicts token t+1, so response token j of sample i
(at input position P_i + j) is scored at output position ``P_i − 1 + j``;
:func:`place_per_token` / :func:`extract_per_token` convert between per-response
``[R_i]`` tensors and the micro-batch's ``[B, S]`` layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from sophiavl_mcore.models.unwrap import unwrap_model

if TYPE_CHECKING:
    from sophiavl_mcore.trainer.collate import SFTMicroBatch

__all__ = ["MicroBatch", "RolloutBatch", "extract_per_token", "place_per_token"]

_PER_TOKEN = ("response_mask", "rollout_logprobs", "old_logprobs", "ref_logprobs")


@dataclasses.dataclass
class MicroBatch:
    """One right-padded micro-batch (``B`` rows, ``S`` positions).

    Attributes:
        indices: the batch indices of the rows.
        tensors: ``input_ids`` / ``labels`` int64 [B,S], ``position_ids`` int64 [3,B,S],
            ``response_mask`` fp32 [B,S] (1 at output
            positions that score a response token in the loss), ``advantages`` fp32 [B],
            ``old_logprobs`` / ``ref_logprobs`` / ``rollout_logprobs`` fp32 [B,S] when the
            batch has them, ``pixel_values`` / ``image_grid_thw`` or None (the distinct
            images, with ``image_index`` int64 [images] when samples share one).
        prompt_lens / response_lens: P_i and R_i of the rows.
        num_tokens: non-padding input tokens (prompt + response) of the rows.
    """

    indices: list[int]
    tensors: dict[str, torch.Tensor | None]
    prompt_lens: list[int]
    response_lens: list[int]
    num_tokens: int

    def to(self, device: torch.device) -> MicroBatch:
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in self.tensors.items()}
        return dataclasses.replace(self, tensors=moved)


def place_per_token(values: Sequence[torch.Tensor], prompt_lens: Sequence[int], seq: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-response ``[R_i]`` tensors → ``[B, seq]`` at output positions ``P_i−1 …``; 0 elsewhere."""
    out = torch.zeros(len(values), seq, dtype=dtype)
    for b, (v, p) in enumerate(zip(values, prompt_lens, strict=True)):
        out[b, p - 1:p - 1 + v.numel()] = v.to(dtype)
    return out


def extract_per_token(t: torch.Tensor, prompt_lens: Sequence[int],
                      response_lens: Sequence[int]) -> list[torch.Tensor]:
    """``[B, S]`` output-position values → per-response ``[R_i]`` (inverse of the above)."""
    return [t[b, p - 1:p - 1 + r] for b, (p, r) in enumerate(zip(prompt_lens, response_lens,
                                                                     strict=True))]


def _check_list(name: str, value: Sequence[object] | None, n: int) -> None:
    if value is not None and len(value) != n:
        raise ValueError(f"RolloutBatch.{name} has {len(value)} entries, expected one per "
                         f"response ({n})")


@dataclasses.dataclass
class RolloutBatch:
    """N sampled responses with everything the trainer needs (see the module docstring)."""

    prompt_ids: list[torch.Tensor]
    response_ids: list[torch.Tensor]
    advantages: torch.Tensor
    group_ids: torch.Tensor
    problem_types: list[str]
    response_mask: list[torch.Tensor] | None = None
    rollout_logprobs: list[torch.Tensor] | None = None
    pixel_values: list[torch.Tensor | None] | None = None
    image_grid_thw: list[torch.Tensor | None] | None = None
    position_ids: list[torch.Tensor] | None = None
    old_logprobs: list[torch.Tensor] | None = None
    ref_logprobs: list[torch.Tensor] | None = None
    pad_id: int = 0
    # token ids the rollout engine never sampled (vLLM logit bias -100): the trainer's
    # log-probs come from the same biased distribution, so old/new ratios are exact
    biased_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        self.advantages = torch.as_tensor(self.advantages, dtype=torch.float32).reshape(-1)
        self.group_ids = torch.as_tensor(self.group_ids, dtype=torch.long).reshape(-1)
        for name in ("response_ids", "problem_types", "pixel_values", "image_grid_thw",
                     "position_ids", *_PER_TOKEN):
            _check_list(name, getattr(self, name), n)
        for name in ("advantages", "group_ids"):
            if getattr(self, name).numel() != n:
                raise ValueError(f"RolloutBatch.{name} has {getattr(self, name).numel()} values, "
                                 f"expected one per response ({n})")
        bad = torch.nonzero(~torch.isfinite(self.advantages)).flatten().tolist()
        if bad:
            raise ValueError(f"RolloutBatch.advantages: non-finite at responses {bad[:8]}")
        if self.response_mask is None:
            self.response_mask = [torch.ones(r.numel(), dtype=torch.bool) for r in self.response_ids]
        for i in range(n):
            self._check_sample(i)

    def _check_sample(self, i: int) -> None:
        p, r = self.prompt_ids[i], self.response_ids[i]
        if p.dim() != 1 or p.numel() < 1 or r.dim() != 1 or r.numel() < 1:
            raise ValueError(f"RolloutBatch response {i}: prompt_ids {tuple(p.shape)} and "
                             f"response_ids {tuple(r.shape)} must be non-empty 1-D tensors")
        if p.dtype.is_floating_point or r.dtype.is_floating_point:
            raise TypeError(f"RolloutBatch response {i}: token ids must be integers, got "
                            f"{p.dtype} / {r.dtype}")
        for name in _PER_TOKEN:
            values = getattr(self, name)
            if values is not None and tuple(values[i].shape) != (r.numel(),):
                raise ValueError(f"RolloutBatch.{name}[{i}] has shape {tuple(values[i].shape)}, "
                                 f"expected [R_i] = ({r.numel()},) like response_ids[{i}]")
        if self.position_ids is not None:
            want = (3, p.numel() + r.numel())
            if tuple(self.position_ids[i].shape) != want:
                raise ValueError(f"RolloutBatch.position_ids[{i}] has shape "
                                 f"{tuple(self.position_ids[i].shape)}, expected {want}")
        pv = self.pixel_values[i] if self.pixel_values is not None else None
        grid = self.image_grid_thw[i] if self.image_grid_thw is not None else None
        if (pv is None) != (grid is None):
            raise ValueError(f"RolloutBatch response {i}: pixel_values and image_grid_thw must "
                             "be given together")
        if grid is not None and int(grid.prod(-1).sum()) != pv.shape[0]:
            raise ValueError(f"RolloutBatch response {i}: image_grid_thw {grid.tolist()} "
                             f"describes {int(grid.prod(-1).sum())} patches, pixel_values has "
                             f"{pv.shape[0]} rows")

    # -- sizes ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def prompt_lens(self) -> list[int]:
        return [int(p.numel()) for p in self.prompt_ids]

    @property
    def response_lens(self) -> list[int]:
        return [int(r.numel()) for r in self.response_ids]

    def num_tokens(self) -> int:
        """Non-padding input tokens (prompts + responses) of this share."""
        return sum(self.prompt_lens) + sum(self.response_lens)

    def num_response_tokens(self) -> int:
        """Response tokens that enter the loss (``response_mask`` true)."""
        return int(sum(int(m.sum()) for m in self.response_mask))

    # -- subsets -------------------------------------------------------------------------

    def select(self, indices: Sequence[int]) -> RolloutBatch:
        """The responses at ``indices`` (tensors are shared, not copied)."""
        idx = list(indices)
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx]
            elif isinstance(v, list) and f.name != "biased_ids":
                out[f.name] = [v[i] for i in idx]
            else:
                out[f.name] = v
        return RolloutBatch(**out)

    def shard(self, dp_rank: int, dp: int) -> RolloutBatch:
        """This data-parallel rank's contiguous share (N must divide evenly)."""
        n = len(self)
        if dp < 1 or not 0 <= dp_rank < dp or n % dp:
            raise ValueError(f"cannot shard {n} responses over dp={dp} ranks (dp_rank={dp_rank}); "
                             "the global batch must be a multiple of the data-parallel size")
        per = n // dp
        return self.select(range(dp_rank * per, (dp_rank + 1) * per))

    # -- model inputs --------------------------------------------------------------------

    def ensure_position_ids(self, model: torch.nn.Module) -> None:
        """Fill ``position_ids`` with the model's M-RoPE positions (once; cached).

        ``model``: a Qwen2.5-VL stage (bare or wrapped); any stage can compute them.
        """
        if self.position_ids is not None:
            return
        core = unwrap_model(model)
        if not hasattr(core, "compute_position_ids"):
            raise TypeError(f"{type(core).__name__} has no compute_position_ids; the GRPO "
                            "trainer runs Qwen2.5-VL stages (models.qwen2_5_vl)")
        positions = []
        for i in range(len(self)):
            ids = torch.cat([self.prompt_ids[i], self.response_ids[i]]).long()
            grid = self.image_grid_thw[i] if self.image_grid_thw is not None else None
            positions.append(core.compute_position_ids(ids[None], grid)[:, 0])
        self.position_ids = positions

    def micro_batches(self, micro_batch_size: int, pad_to_multiple_of: int = 8) -> list[MicroBatch]:
        """Length-sorted, right-padded micro-batches (see the module docstring).

        Needs ``position_ids`` (:meth:`ensure_position_ids`).
        """
        from sophiavl_mcore.trainer.collate import SFTExample, collate

        if micro_batch_size < 1 or pad_to_multiple_of < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} and pad_to_multiple_of="
                             f"{pad_to_multiple_of} must be >= 1")
        if self.position_ids is None:
            raise ValueError("RolloutBatch.position_ids not computed; call ensure_position_ids(model)")
        total = [p + r for p, r in zip(self.prompt_lens, self.response_lens, strict=True)]
        # Ties by group: a group's samples (one shared image) land in the same micro-batch.
        order = sorted(range(len(self)), key=lambda i: (total[i], int(self.group_ids[i])))
        out = []
        for s in range(0, len(order), micro_batch_size):
            idx = order[s:s + micro_batch_size]
            examples = []
            for i in idx:
                ids = torch.cat([self.prompt_ids[i], self.response_ids[i]]).long()
                # collate's loss_mask marks every response position; ours refines it below
                target = torch.zeros(ids.numel(), dtype=torch.bool)
                target[self.prompt_lens[i]:] = True
                # Images are collated below, each shared tensor once.
                examples.append(SFTExample(ids, target, source=f"rollout response {i}"))
            mb = collate(examples, self.pad_id, pad_to_multiple_of)
            if self.pixel_values is not None:
                mb.update(_distinct_images([self.pixel_values[i] for i in idx],
                                           [self.image_grid_thw[i] for i in idx]))
            out.append(self._micro_batch(idx, mb))
        return out

    def _micro_batch(self, idx: list[int], mb: SFTMicroBatch) -> MicroBatch:
        batch, seq = mb["input_ids"].shape
        plens = [self.prompt_lens[i] for i in idx]
        rlens = [self.response_lens[i] for i in idx]
        pos = torch.zeros(3, batch, seq, dtype=torch.long)  # padding: position 0, never scored
        for b, i in enumerate(idx):
            pos[:, b, :self.position_ids[i].shape[-1]] = self.position_ids[i]
        tensors: dict[str, torch.Tensor | None] = {
            "input_ids": mb["input_ids"], "labels": mb["labels"], "position_ids": pos,
            "pixel_values": mb["pixel_values"], "image_grid_thw": mb["image_grid_thw"],
            "advantages": self.advantages[idx],
        }
        if mb.get("image_index") is not None:
            tensors["image_index"] = mb["image_index"]
        for name in _PER_TOKEN:
            values = getattr(self, name)
            if values is not None:
                tensors[name] = place_per_token([values[i] for i in idx], plens, seq)
        # Guard the layout: every scored position is one collate marked as a target.
        if bool(((tensors["response_mask"] > 0) & (mb["loss_mask"] == 0)).any()):
            raise RuntimeError("response positions disagree with collate's loss_mask (layout bug)")
        return MicroBatch(idx, tensors, plens, rlens, mb["num_input_tokens"])


def _distinct_images(pixel_values: Sequence[torch.Tensor | None],
                     grids: Sequence[torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """A micro-batch's images, each shared tensor object once (the samples of a group
    share their prompt's image tensor): ``pixel_values`` [patches, D] and
    ``image_grid_thw`` [U, 3] of the distinct images (None without images), and, when
    some image repeats, ``image_index`` int64 [images in row order] naming each
    occurrence's distinct image."""
    first: dict[int, int] = {}  # id(tensor) -> first image row of it among the distinct
    pvs, gs, index = [], [], []
    rows = 0
    for pv, grid in zip(pixel_values, grids, strict=True):
        if pv is None:
            continue
        if id(pv) not in first:
            first[id(pv)] = rows
            pvs.append(pv)
            gs.append(grid)
            rows += grid.shape[0]
        index.extend(range(first[id(pv)], first[id(pv)] + grid.shape[0]))
    out: dict[str, torch.Tensor | None] = {
        "pixel_values": torch.cat(pvs) if pvs else None,
        "image_grid_thw": torch.cat(gs) if gs else None}
    if rows < len(index):
        out["image_index"] = torch.tensor(index, dtype=torch.long)
    return out
