"""Token examples and their right-padded micro-batch, shared by the SFT trainer and
the GRPO micro-batches (:meth:`~sophiavl_mcore.trainer.grpo.rollout_batch.RolloutBatch.micro_batches`).

    input_ids [B,S], labels [B,S] (= input_ids shifted left), loss_mask [B,S] (1 on
    positions whose *next* token is a target token), pixel_values [P, 3·2·14·14],
    image_grid_thw [I, 3]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NotRequired, TypedDict

import torch

__all__ = ["SFTExample", "SFTMicroBatch", "collate"]


@dataclasses.dataclass
class SFTExample:
    """One tokenised example.

    Attributes:
        input_ids: int64 [S] prompt + target tokens (image pads already expanded).
        target_mask: bool [S], True on target tokens (the ones the model must produce).
        pixel_values: float32 [P, 3·T·p·p] patches of the example's images, or None.
        image_grid_thw: int64 [I, 3], or None.
        source: where the example came from (file and record), for messages.
    """

    input_ids: torch.Tensor
    target_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 1 or self.target_mask.shape != self.input_ids.shape:
            raise ValueError(f"{self.source}: input_ids {tuple(self.input_ids.shape)} and "
                             f"target_mask {tuple(self.target_mask.shape)} must be equal 1-D shapes")
        if not bool(self.target_mask[1:].any()):
            # Position 0 is never predicted, so a target there would count for nothing.
            raise ValueError(f"{self.source}: no target token after position 0")

    @property
    def num_target_tokens(self) -> int:
        return int(self.target_mask[1:].sum())


class SFTMicroBatch(TypedDict):
    """One collated micro-batch (shapes in the module docstring)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    num_input_tokens: int
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    # Rollout micro-batches whose samples share an image: each image row's distinct image
    # (set by RolloutBatch.micro_batches, never by collate).
    image_index: NotRequired[torch.Tensor | None]


def collate(examples: Sequence[SFTExample], pad_id: int, pad_to_multiple_of: int = 8
            ) -> SFTMicroBatch:
    """Right-pad ``examples`` into one micro-batch (see the module docstring for shapes).

    ``labels[b, t] = input_ids[b, t+1]`` and ``loss_mask[b, t] = target_mask[b, t+1]``:
    the model's output at ``t`` predicts token ``t+1``. Padding positions carry
    ``pad_id`` labels with mask 0.
    """
    if not examples:
        raise ValueError("collate: no examples")
    longest = max(int(e.input_ids.numel()) for e in examples)
    seq = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, seq), pad_id, dtype=torch.long)
    target = torch.zeros(batch, seq, dtype=torch.bool)
    valid = torch.zeros(batch, seq, dtype=torch.bool)
    for b, ex in enumerate(examples):
        n = int(ex.input_ids.numel())
        input_ids[b, :n] = ex.input_ids
        target[b, :n] = ex.target_mask
        valid[b, :n] = True
    labels = torch.full_like(input_ids, pad_id)
    labels[:, :-1] = input_ids[:, 1:]
    loss_mask = torch.zeros(batch, seq, dtype=torch.float32)
    loss_mask[:, :-1] = target[:, 1:].float()
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    grids = [e.image_grid_thw for e in examples if e.image_grid_thw is not None]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "num_input_tokens": int(valid.sum()),
        "pixel_values": torch.cat(pixels) if pixels else None,
        "image_grid_thw": torch.cat(grids) if grids else None,
    }
