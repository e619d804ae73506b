"""Multimodal rotary position ids (M-RoPE) for Qwen2.5-VL: three rows ``(t, h, w)``.

Text tokens get the same running position on all three rows. The ``llm_grid_t × llm_grid_h
× llm_grid_w`` placeholder tokens of one image (or video) get a 3-D grid of positions offset
by the running position at the image start; the running position then advances by
``max(grid_h, grid_w) / spatial_merge_size`` (not by the token count), which is why
M-RoPE positions end below the sequence length and why ``deltas`` exist for decoding.

The numbers are the ones transformers' ``Qwen2_5_VLModel.get_rope_index`` produces
(tested against it on random layouts). Differences in interface only: image/video tokens
are found from ``input_ids`` and the token ids instead of ``mm_token_type_ids``, and a run
of adjacent placeholders may hold several images (it is split by each image's token count).
Padding (``attention_mask == 0``) gets position 0 on every row, as in transformers.
"""

from __future__ import annotations

import dataclasses

import torch


class RopeIndexError(ValueError):
    """Placeholder tokens and grids do not agree; the message names the sample and counts."""


@dataclasses.dataclass(frozen=True)
class MRopeTokens:
    """Token ids and vision geometry that M-RoPE positions depend on.

    Attributes:
        image_token_id: placeholder id of one merged image patch (Qwen2.5-VL: 151655).
        video_token_id: placeholder id of one merged video patch (Qwen2.5-VL: 151656).
        spatial_merge_size: patches merged per side by the vision merger (2).
        tokens_per_second: temporal position units per second of video (Qwen2.5-VL: 2).
    """

    image_token_id: int = 151655
    video_token_id: int = 151656
    spatial_merge_size: int = 2
    tokens_per_second: int = 2

    def __post_init__(self) -> None:
        if self.spatial_merge_size < 1:
            raise RopeIndexError(f"spatial_merge_size must be >= 1, got {self.spatial_merge_size}")
        if self.image_token_id == self.video_token_id:
            raise RopeIndexError(
                f"image_token_id and video_token_id must differ, both are {self.image_token_id}"
            )

    @classmethod
    def from_hf_config(cls, hf_config: object) -> MRopeTokens:
        """Read the ids from a ``Qwen2_5_VLConfig`` (object or ``config.json`` dict)."""

        def get(obj: object, key: str, default: object = None) -> object:
            return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)

        vision = get(hf_config, "vision_config") or {}
        defaults = cls()
        return cls(
            image_token_id=int(get(hf_config, "image_token_id", defaults.image_token_id)),
            video_token_id=int(get(hf_config, "video_token_id", defaults.video_token_id)),
            spatial_merge_size=int(get(vision, "spatial_merge_size", defaults.spatial_merge_size)),
            tokens_per_second=int(get(vision, "tokens_per_second", defaults.tokens_per_second)),
        )


def _runs(kinds: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values in a 1-D tensor as ``(value, start, end)``."""
    if kinds.numel() == 0:
        return []
    change = torch.nonzero(kinds[1:] != kinds[:-1]).flatten() + 1
    starts = [0, *change.tolist()]
    ends = [*change.tolist(), kinds.numel()]
    values = kinds[starts].tolist()
    return list(zip(values, starts, ends, strict=True))


def _grid_positions(
    start: int, grid_thw: torch.Tensor, merge: int, time_interval: float | torch.Tensor, device: torch.device
) -> torch.Tensor:
    """(3, t*h*w) positions of one merged vision grid starting at running position ``start``."""
    t, h, w = (int(v) for v in grid_thw.tolist())
    t_pos = (torch.arange(t, device=device) * time_interval).long() + start
    h_pos = torch.arange(h // merge, device=device) + start
    w_pos = torch.arange(w // merge, device=device) + start
    grid = torch.meshgrid(t_pos, h_pos, w_pos, indexing="ij")
    return torch.stack(grid, dim=0).reshape(3, -1)


def get_rope_index(
    input_ids: torch.Tensor,
    tokens: MRopeTokens,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids of a batch.

    Args:
        input_ids: ``[B, S]`` token ids; image/video placeholders as in ``tokens``.
        tokens: placeholder ids and merge geometry.
        image_grid_thw: ``[num_images, 3]`` patch grid (t, h, w) of every image in the
            batch, in order of appearance (row-major over the batch).
        video_grid_thw: ``[num_videos, 3]`` likewise for videos.
        second_per_grid_ts: ``[num_videos]`` seconds per temporal grid step (default 1).
        attention_mask: ``[B, S]`` 1 for real tokens, 0 for padding (left or right).

    Returns:
        ``position_ids`` ``[3, B, S]`` (int64, same device as ``input_ids``) and
        ``deltas`` ``[B, 1]``: max position + 1 − number of real tokens per sample.

    Raises:
        RopeIndexError: placeholder counts do not match the grids (names the sample,
            the run and both counts) or grids are left over.
    """
    if input_ids.dim() != 2:
        raise RopeIndexError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    device = input_ids.device
    merge = tokens.spatial_merge_size
    batch, seq = input_ids.shape
    position_ids = torch.zeros(3, batch, seq, dtype=torch.long, device=device)
    grids = {1: image_grid_thw, 2: video_grid_thw}
    cursor = {1: 0, 2: 0}
    deltas = []
    for b in range(batch):
        valid = attention_mask[b].bool() if attention_mask is not None else None
        ids = input_ids[b][valid] if valid is not None else input_ids[b]
        kinds = (ids == tokens.image_token_id).long() + 2 * (ids == tokens.video_token_id).long()
        pieces = []
        pos = 0
        for kind, start, end in _runs(kinds):
            if kind == 0:
                pieces.append(torch.arange(end - start, device=device).expand(3, -1) + pos)
                pos += end - start
                continue
            remaining = end - start
            while remaining > 0:
                name = "image" if kind == 1 else "video"
                table = grids[kind]
                if table is None or cursor[kind] >= table.shape[0]:
                    have = 0 if table is None else table.shape[0]
                    raise RopeIndexError(
                        f"sample {b}: {name} placeholder run at token {start} needs grid "
                        f"#{cursor[kind]} but {name}_grid_thw has {have} rows"
                    )
                thw = table[cursor[kind]]
                n_tokens = int(thw.prod()) // (merge * merge)
                if n_tokens > remaining:
                    raise RopeIndexError(
                        f"sample {b}: {name} #{cursor[kind]} grid_thw={thw.tolist()} needs "
                        f"{n_tokens} placeholder tokens (merge {merge}) but the run at token "
                        f"{start} has {remaining} left"
                    )
                interval: float | torch.Tensor = 1
                if kind == 2:
                    # kept as a tensor so the float32 rounding before .long() matches HF
                    sec = 1 if second_per_grid_ts is None else second_per_grid_ts[cursor[kind]]
                    interval = tokens.tokens_per_second * sec
                pieces.append(_grid_positions(pos, thw, merge, interval, device))
                pos += max(int(thw[1]), int(thw[2])) // merge
                cursor[kind] += 1
                remaining -= n_tokens
        if pieces:
            positions = torch.cat(pieces, dim=1)
            deltas.append(int(positions.max()) + 1 - ids.numel())
        else:
            positions = torch.zeros(3, 0, dtype=torch.long, device=device)
            deltas.append(0)
        if valid is not None:
            position_ids[:, b, valid] = positions
        else:
            position_ids[:, b] = positions
    for kind, table in grids.items():
        if table is not None and cursor[kind] != table.shape[0]:
            name = "image" if kind == 1 else "video"
            raise RopeIndexError(
                f"{name}_grid_thw has {table.shape[0]} rows but the batch has placeholders "
                f"for {cursor[kind]} {name}(s)"
            )
    return position_ids, torch.tensor(deltas, dtype=torch.long, device=device).unsqueeze(1)
