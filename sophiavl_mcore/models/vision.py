"""Qwen2.5-VL vision tower for the Megatron policy: transformers' module, replicated over TP.

Choice: reuse ``transformers``' ``Qwen2_5_VisionTransformerPretrainedModel`` (window
attention, 2-D axial rotary, patch merger) rather than re-writing it with Megatron layers.

* Correctness: the window permutation, uneven window padding, full-attention blocks and
  the merger order are subtle; reusing the reference module makes HF parity exact and
  keeps hub weight names (``visual.*``) 1:1, so conversion is a plain copy.
* Memory: the 72B tower has 0.70 B parameters (:func:`vision_param_count`), i.e. about
  0.8 of one 72B decoder layer (0.88 B). Replicated, each first-stage rank holds all of
  it, while a decoder layer costs a rank 1/TP of itself: at TP=8 the tower weighs as
  much per rank as ~6 decoder layers (bf16 weights 1.4 GB + fp32 grads 2.8 GB +
  optimizer state 8.4 GB / DP with the distributed optimizer). The remedy is cheap: give
  the first stage ~6 fewer decoder layers (``parallel.layers_per_stage``). Splitting
  the tower over TP instead would add two collectives per vision block (32 blocks) on
  a model with ~1% of the step's FLOPs, and lose exact HF parity of the window code.
* Compute: every TP rank of the first stage runs the same tower on the same pixels
  (redundant, but communication-free). The tower is ~1% of the 72B model's parameters
  and sees 4× more tokens than the LM per image (before the 2×2 merge), so the
  duplicated work is a few percent of the first stage's step.

Gradient contract (TP-replicated parameters): all TP ranks see identical inputs and the
gradient arriving at the image embeddings is identical after the LM's input all-reduce,
so the tower's grads agree up to reduction order. To keep replicas bit-identical over
many steps they are averaged across the TP group:

* automatically by Megatron's ``finalize_model_grads`` (the default
  ``config.finalize_model_grads_func`` of the ``get_forward_backward_func`` schedules when
  the model is wrapped in Megatron DDP), because :func:`mark_tp_replicated` sets
  ``average_gradients_across_tp_domain = True`` on every tower parameter;
* explicitly by :func:`allreduce_tp_replicated_grads` for trainers that do not use
  Megatron DDP — the trainer must call it after backward, before the optimizer step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

TP_AVERAGE_ATTR = "average_gradients_across_tp_domain"


class VisionConfigError(ValueError):
    """A vision_config that cannot build a Qwen2.5-VL tower (names the field)."""


def vision_config_from_hf(hf_config: Any) -> Any:
    """A transformers ``Qwen2_5_VLVisionConfig`` from whatever the caller holds.

    Accepts a full ``Qwen2_5_VLConfig`` (object or ``config.json`` dict, whose
    ``vision_config`` is used), a vision config object, or a vision config dict.
    """
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    if isinstance(hf_config, Qwen2_5_VLVisionConfig):
        return hf_config
    if isinstance(hf_config, Mapping):
        section = hf_config.get("vision_config", hf_config)
        if not isinstance(section, Mapping):
            raise VisionConfigError(f"vision_config should be a mapping, got {type(section).__name__}")
        fields = {k: v for k, v in section.items() if k not in ("model_type", "architectures")}
        try:
            cfg = Qwen2_5_VLVisionConfig(**fields)
        except (TypeError, ValueError) as err:
            raise VisionConfigError(f"vision_config {sorted(fields)}: {err}") from err
    else:
        section = getattr(hf_config, "vision_config", None)
        if section is None:
            raise VisionConfigError(
                f"{type(hf_config).__name__} has no vision_config; expected a Qwen2.5-VL config"
            )
        cfg = vision_config_from_hf(section if not isinstance(section, Mapping) else dict(section))
    _validate(cfg)
    return cfg


def _validate(cfg: Any) -> None:
    head_dim, rem = divmod(cfg.hidden_size, cfg.num_heads)
    if rem or head_dim % 4:
        raise VisionConfigError(
            f"vision_config hidden_size={cfg.hidden_size} / num_heads={cfg.num_heads} must give "
            f"an integer head_dim divisible by 4 (2-D rotary), got {cfg.hidden_size / cfg.num_heads}"
        )
    bad = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.depth]
    if bad:
        raise VisionConfigError(
            f"vision_config fullatt_block_indexes={list(cfg.fullatt_block_indexes)} has {bad} "
            f"outside [0, depth={cfg.depth})"
        )
    unit = cfg.patch_size * cfg.spatial_merge_size
    if cfg.window_size % unit:
        raise VisionConfigError(
            f"vision_config window_size={cfg.window_size} must be a multiple of "
            f"patch_size*spatial_merge_size={unit}"
        )


def build_vision_tower(
    hf_config: Any,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Build the (randomly initialised) Qwen2.5-VL vision tower.

    Args:
        hf_config: see :func:`vision_config_from_hf`.
        dtype: parameter dtype.
        device: where parameters live (``"meta"`` for shape-only builds).
        attn_implementation: transformers attention backend; default ``sdpa`` (on GPU,
            ``flash_attention_2`` avoids the per-window loop when flash-attn is installed).

    Returns:
        ``Qwen2_5_VisionTransformerPretrainedModel``; ``forward(pixel_values
        [num_patches, C*T*P*P], grid_thw [num_images, 3]).pooler_output`` is
        ``[num_patches / merge², out_hidden_size]``.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    cfg = vision_config_from_hf(hf_config)
    with torch.device(device if device is not None else "cpu"):
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(
            cfg, dtype=dtype, attn_implementation=attn_implementation or "sdpa"
        )
    return tower


def vision_param_count(hf_vision_config: Any) -> int:
    """Parameter count of the Qwen2.5-VL vision tower, built on the meta device (no memory)."""
    tower = build_vision_tower(hf_vision_config, dtype=torch.bfloat16, device="meta")
    return sum(p.numel() for p in tower.parameters())


def mark_tp_replicated(module: torch.nn.Module) -> None:
    """Tag every parameter so Megatron's ``finalize_model_grads`` averages it over TP."""
    for param in module.parameters():
        setattr(param, TP_AVERAGE_ATTR, True)


def allreduce_tp_replicated_grads(
    params: Iterable[torch.nn.Parameter], group: torch.distributed.ProcessGroup | None = None
) -> int:
    """Average gradients of TP-replicated parameters across the TP group, in place.

    Uses ``param.main_grad`` (Megatron DDP) when present, else ``param.grad``; parameters
    without a gradient are skipped. One coalesced all-reduce per dtype.

    Args:
        params: parameters tagged by :func:`mark_tp_replicated` (others are ignored).
        group: TP process group; default Megatron's tensor-model-parallel group.

    Returns:
        Number of gradient tensors reduced (0 when TP size is 1).
    """
    from megatron.core import parallel_state
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if group is None:
        group = parallel_state.get_tensor_model_parallel_group()
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return 0
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in params:
        if not getattr(param, TP_AVERAGE_ATTR, False):
            continue
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        if grad is not None:
            by_dtype.setdefault(grad.dtype, []).append(grad)
    count = 0
    for grads in by_dtype.values():
        flat = _flatten_dense_tensors(grads)
        # gloo has no ReduceOp.AVG; SUM then divide works on both backends.
        torch.distributed.all_reduce(flat, group=group)
        flat /= size
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)
        count += len(grads)
    return count
