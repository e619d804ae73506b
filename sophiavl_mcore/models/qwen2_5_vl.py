"""Qwen2.5-VL policy on Megatron-Core: HF vision tower + mcore GPTModel with M-RoPE.

Data flow on one pipeline stage (tensors sequence-first inside Megatron)::

    first stage:  input_ids [B,S] ─► word embeddings [S,B,H] (vocab-parallel, all-reduced)
                  pixel_values [N, C*T*P*P], image_grid_thw [I,3] ─► vision tower
                      ─► image embeds [N/merge², H] ─► written at image-token positions
                  (sequence parallel: scattered over TP after the write)
    every stage:  position_ids [3,B,S] (t,h,w; computed from input_ids when None)
                  ─► M-RoPE inside the decoder layers of this stage
    last stage:   output layer ─► logits [B,S,V_pad/TP] (vocab-parallel), or the
                  per-token vocab-parallel cross-entropy [B,S] when labels are given.

The vision tower exists only where ``pre_process`` is true (first stage). Later stages
receive hidden states through Megatron's p2p (``set_input_tensor``). Why the tower is
transformers' module, replicated over TP, and how its gradients are averaged over TP:
see :mod:`sophiavl_mcore.models.vision`.

Parameter names: ``visual.*`` exactly as in the hub checkpoint, ``language_model.*`` the
GPTModel's own names (``embedding.word_embeddings.weight``, ``decoder.layers.N...``,
``output_layer.weight``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from sophiavl_mcore.models.hf_config import load_config_json
from sophiavl_mcore.models.qwen2 import build_qwen2_lm
from sophiavl_mcore.models.rope_index import MRopeTokens, get_rope_index
from sophiavl_mcore.models.vision import (
    allreduce_tp_replicated_grads,
    build_vision_tower,
    mark_tp_replicated,
)

logger = logging.getLogger(__name__)


class VLInputError(ValueError):
    """Inputs that do not fit together (image tokens vs. features, shapes); names counts."""


@dataclasses.dataclass
class VisionOptions:
    """Vision-tower options (the one source of their defaults).

    Attributes:
        freeze: no gradients for the tower (it still runs forward).
        init_seed: seed of the tower's random init (same on every rank).
        attn_implementation: transformers attention for the tower; ``flash_attention_2``
            needs CUDA + flash-attn and skips the per-window Python loop of ``sdpa``.
    """

    freeze: bool = False
    init_seed: int = 1234
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


def padding_to_attention_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """[B,S] 1/0 validity → Megatron bool mask [B,1,S,S] (True = masked), causal included.

    A query always sees itself, so padding rows are never fully masked (softmax over an
    empty row gives NaN, which would reach gradients through masked-out logits).
    """
    seq = padding_mask.shape[1]
    device = padding_mask.device
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    allowed = causal[None] & padding_mask.bool()[:, None, :]
    allowed |= torch.eye(seq, dtype=torch.bool, device=device)[None]
    return ~allowed[:, None]


class Qwen25VLModel(torch.nn.Module):
    """Megatron-style Qwen2.5-VL: one pipeline stage's share of vision tower + LM.

    Exposes what Megatron's schedules and ``finalize_model_grads`` look up on a model
    (``config``, ``model_type``, ``set_input_tensor``, ``pre_process``, ``post_process``,
    ``share_embeddings_and_output_weights``, ``shared_embedding_or_output_weight``).
    """

    def __init__(
        self,
        language_model: torch.nn.Module,
        visual: torch.nn.Module | None,
        tokens: MRopeTokens,
    ) -> None:
        super().__init__()
        from megatron.core.enums import ModelType

        self.language_model = language_model
        self.visual = visual
        self.tokens = tokens
        self.config = language_model.config
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.share_embeddings_and_output_weights = (
            language_model.share_embeddings_and_output_weights
        )
        if self.pre_process != (visual is not None):
            raise ValueError(
                f"the vision tower belongs to the first stage: pre_process={self.pre_process} "
                f"but visual is {'present' if visual is not None else 'missing'}"
            )

    # -- what Megatron's schedules and grad finalisation call -----------------------------

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Hidden states [S,B,H] from the previous pipeline stage (Megatron p2p)."""
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        return self.language_model.shared_embedding_or_output_weight()

    def checkpoint_module(self) -> torch.nn.Module:
        """A view whose ``state_dict`` names are the conversion plan's names.

        The LM's children appear at top level (``embedding.*``, ``decoder.*``,
        ``output_layer.*`` as in a plain GPTModel) beside ``visual.*``; the tensors are
        shared with this model, so ``checkpoint.load_hf_into_model``,
        ``load_mcore_shard`` and ``save_mcore_shard`` work on the view unchanged.
        """
        view = torch.nn.Module()
        for name, child in self.language_model.named_children():
            view.add_module(name, child)
        if self.visual is not None:
            view.add_module("visual", self.visual)
        return view

    def allreduce_vision_grads(self) -> int:
        """Average the tower's gradients over TP; for trainers without Megatron DDP.

        With Megatron DDP + ``finalize_model_grads`` this happens automatically (the
        parameters carry ``average_gradients_across_tp_domain``); do not call both.
        Returns the number of gradients reduced.
        """
        if self.visual is None:
            return 0
        return allreduce_tp_replicated_grads(self.visual.parameters())

    # -- forward ---------------------------------------------------------------------------

    def compute_position_ids(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """M-RoPE positions [3,B,S] (see :mod:`sophiavl_mcore.models.rope_index`)."""
        padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        positions, _ = get_rope_index(
            input_ids, self.tokens, image_grid_thw=image_grid_thw, attention_mask=padding
        )
        return positions

    def image_embeddings(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision tower output [sum_i t_i*h_i*w_i / merge², H_lm] in image order."""
        if self.visual is None:
            raise RuntimeError("image_embeddings called on a stage without the vision tower")
        if pixel_values.dim() != 2 or image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
            raise VLInputError(
                f"pixel_values must be [num_patches, C*T*P*P] and image_grid_thw [num_images, 3]; "
                f"got {tuple(pixel_values.shape)} and {tuple(image_grid_thw.shape)}"
            )
        patches = int(image_grid_thw.prod(-1).sum())
        if patches != pixel_values.shape[0]:
            raise VLInputError(
                f"image_grid_thw {image_grid_thw.tolist()} describes {patches} patches but "
                f"pixel_values has {pixel_values.shape[0]} rows"
            )
        dtype = next(self.visual.parameters()).dtype
        out = self.visual(pixel_values.to(dtype), grid_thw=image_grid_thw)
        return out.pooler_output

    def shared_image_embeddings(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                                image_index: torch.Tensor) -> torch.Tensor:
        """Embeddings of images that repeat, the vision tower run once per distinct image.

        ``pixel_values`` / ``image_grid_thw`` [U, 3] hold the U distinct images;
        ``image_index`` int64 [I] names, for each image occurrence in token order, its
        distinct image. Returns [sum over occurrences of tokens, H_lm] — the same as
        :meth:`image_embeddings` of the repeated images, with the gradient of a repeated
        image summed over its occurrences (a GRPO group's samples share one image).
        """
        if image_index.dim() != 1 or (image_index.numel() and (
                int(image_index.min()) < 0 or int(image_index.max()) >= image_grid_thw.shape[0])):
            raise VLInputError(f"image_index must be [num_images] in [0, {image_grid_thw.shape[0]}); "
                               f"got {image_index.tolist()}")
        feats = self.image_embeddings(pixel_values, image_grid_thw)
        patches = image_grid_thw.prod(-1)
        # Every image's patches are merged by the same factor: tokens per image follow.
        tokens = patches * feats.shape[0] // int(patches.sum())
        starts = torch.cumsum(tokens, 0) - tokens
        counts, firsts = tokens[image_index], starts[image_index]
        out_starts = torch.cumsum(counts, 0) - counts
        total = int(counts.sum())
        within = torch.arange(total, device=feats.device) - torch.repeat_interleave(out_starts, counts)
        return feats.index_select(0, torch.repeat_interleave(firsts, counts) + within)

    def _embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """First-stage decoder input [S,B,H] (or [S/TP,B,H] with sequence parallel)."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        image_pos = (input_ids == self.tokens.image_token_id).nonzero()  # row-major (b, s)
        if pixel_values is not None:
            if image_grid_thw is None:
                raise VLInputError("pixel_values given without image_grid_thw")
            feats = (self.image_embeddings(pixel_values, image_grid_thw) if image_index is None
                     else self.shared_image_embeddings(pixel_values, image_grid_thw, image_index))
            if feats.shape[0] != image_pos.shape[0]:
                raise VLInputError(
                    f"{image_pos.shape[0]} image tokens (id {self.tokens.image_token_id}) in "
                    f"input_ids but the vision tower produced {feats.shape[0]} embeddings for "
                    f"image_grid_thw {image_grid_thw.tolist()}"
                )
            # Out-of-place so autograd reaches both the word and the image embeddings.
            embeddings = embeddings.index_put(
                (image_pos[:, 1], image_pos[:, 0]), feats.to(embeddings.dtype)
            )
        elif image_pos.shape[0]:
            raise VLInputError(
                f"{image_pos.shape[0]} image tokens in input_ids but no pixel_values given"
            )
        if self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One stage's forward.

        Args:
            input_ids: [B,S] token ids (every stage: M-RoPE positions come from them).
            position_ids: [3,B,S] M-RoPE positions; ``None`` computes them.
            attention_mask: ``None`` (causal; right padding needs nothing else), [B,S]
                1/0 validity (→ causal + padding mask), or a Megatron bool mask
                [B,1,S,S] with True = masked.
            pixel_values: [num_patches, 3*2*14*14] from the Qwen2-VL image processor;
                used on the first stage only.
            image_grid_thw: [num_images, 3] patch grid per image (also needed on later
                stages when ``position_ids`` is ``None``).
            labels: [B,S] target ids; the last stage then returns the per-token loss.
            image_index: int64 [num_image_occurrences] or None: ``pixel_values`` /
                ``image_grid_thw`` then hold only distinct images and occurrence k shows
                image ``image_index[k]`` (:meth:`shared_image_embeddings`).

        Returns:
            Last stage: logits [B,S,V_pad/TP] (vocab-parallel; columns beyond the HF
            vocab after gathering are padding) or loss [B,S] with labels. Other stages:
            hidden states [S,B,H] for the next stage.
        """
        if input_ids.dim() != 2:
            raise VLInputError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
        if position_ids is None:
            grids = (image_grid_thw if image_index is None or image_grid_thw is None
                     else image_grid_thw[image_index])
            position_ids = self.compute_position_ids(input_ids, grids, attention_mask)
        elif position_ids.shape != (3, *input_ids.shape):
            raise VLInputError(
                f"position_ids must be [3, B, S] = [3, {input_ids.shape[0]}, "
                f"{input_ids.shape[1]}], got {tuple(position_ids.shape)}"
            )
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = padding_to_attention_mask(attention_mask)
        decoder_input = (
            self._embed(input_ids, pixel_values, image_grid_thw, image_index) if self.pre_process else None
        )
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
        )


def build_qwen2_5_vl(
    hf_config: Mapping[str, Any] | str | Path,
    parallel: Any = None,
    *,
    dtype: torch.dtype = torch.float32,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vision: VisionOptions | None = None,
    perform_initialization: bool = True,
    **lm_kwargs: Any,
) -> Qwen25VLModel:
    """Build this rank's Qwen2.5-VL stage from a Qwen2.5-VL ``config.json``.

    Args:
        hf_config: config.json path / checkpoint dir / parsed dict (hub or transformers-5
            layout: LM fields at top level or under ``text_config``).
        parallel: ``ParallelInfo`` / ``ParallelConfig`` / ``None`` (read parallel_state).
        dtype: parameter dtype of LM and tower.
        pre_process / post_process: first / last pipeline stage; default from
            parallel_state. The vision tower is built only when ``pre_process``.
        vision: tower options.
        perform_initialization: False skips random init of the LM (weights loaded later).
        lm_kwargs: passed to :func:`~sophiavl_mcore.models.qwen2.build_qwen2_lm`
            (``use_te``, ``fp8``, ``fp8_recipe``, ``vocab_divisible_by``, TransformerConfig
            overrides ...).
    """
    from megatron.core import parallel_state

    raw = load_config_json(hf_config)
    if "vision_config" not in raw:
        raise ValueError(f"{hf_config if not isinstance(hf_config, Mapping) else 'config'}: "
                         "no vision_config; not a Qwen2.5-VL config")
    vision = vision or VisionOptions()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    lm = build_qwen2_lm(
        raw,
        parallel,
        dtype=dtype,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type="mrope",
        perform_initialization=perform_initialization,
        **lm_kwargs,
    )
    if pre_process and lm.config.sequence_parallel:
        # Image features are written into the full sequence first; the scatter over TP
        # happens afterwards in Qwen25VLModel._embed.
        lm.embedding.scatter_to_sequence_parallel = False
        lm.embedding.reduce_scatter_embeddings = False
        lm.embedding.word_embeddings.reduce_scatter_embeddings = False
    visual = None
    if pre_process:
        # Same seed on every rank: TP replicas start identical without a broadcast.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(vision.init_seed)
            visual = build_vision_tower(
                raw, dtype=dtype, device="cpu", attn_implementation=vision.attn_implementation
            )
        if not lm.config.use_cpu_initialization:
            visual.to(torch.cuda.current_device())
        mark_tp_replicated(visual)
        if vision.freeze:
            visual.requires_grad_(False)
    return Qwen25VLModel(lm, visual, MRopeTokens.from_hf_config(raw))
