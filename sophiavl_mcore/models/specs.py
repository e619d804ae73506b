"""Transformer layer specs: Transformer Engine on GPU, Megatron-local + torch SDPA on CPU.

The local spec is Megatron's own ``get_gpt_layer_local_spec`` with one substitution:
core attention is :class:`SDPACoreAttention` (``torch.nn.functional.
scaled_dot_product_attention``) instead of ``DotProductAttention``, which allocates
[b·np, sq, sk] scores from the CUDA global memory buffer and materialises the softmax.
Parameter names are identical for both core attentions (neither has parameters), so
checkpoints do not care which one built the model.

Transformer Engine is imported only inside :func:`te_layer_spec` and only when CUDA is
present (DESIGN.md: TE is imported only where CUDA exists).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def te_available() -> bool:
    """True when CUDA and Transformer Engine are both usable (no import side effects)."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def _sdpa_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class SDPACoreAttention(DotProductAttention):
        """Megatron core attention computed with torch SDPA.

        Shapes: query [sq, b, np, hn], key/value [sk, b, ng, hn] (ng query groups on this
        TP rank; GQA expands them), attention_mask None or bool [b|1, 1, sq, sk] with True
        = masked (Megatron's convention). Returns the context [sq, b, np·hn].
        """

        def forward(  # type: ignore[override]
            self,
            query: Tensor,
            key: Tensor,
            value: Tensor,
            attention_mask: Tensor | None,
            attn_mask_type: AttnMaskType | None = None,
            attention_bias: Tensor | None = None,
            packed_seq_params=None,
        ) -> Tensor:
            if packed_seq_params is not None:
                raise NotImplementedError("packed sequences need the TE spec")
            if attention_bias is not None:
                raise NotImplementedError("attention_bias is not supported by SDPACoreAttention")
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            q = query.permute(1, 2, 0, 3)  # [b, np, sq, hn]
            k = key.permute(1, 2, 0, 3)
            v = value.permute(1, 2, 0, 3)
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            attn_mask = None
            is_causal = False
            if attention_mask is not None:
                attn_mask = ~attention_mask.to(torch.bool)
            elif mask_type == AttnMaskType.causal:
                # Bottom-right aligned like Megatron when sq < sk (decode with a cache).
                sq, sk = q.shape[2], k.shape[2]
                if sq == sk:
                    is_causal = True
                else:
                    attn_mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            dropout = self.attention_dropout.p if self.training else 0.0
            rng = contextlib.nullcontext()
            if dropout > 0 and not self.config.sequence_parallel:
                from megatron.core import tensor_parallel

                # Heads are split over TP, so each rank's dropout mask must come from
                # its own model-parallel stream (as Megatron's DotProductAttention does),
                # not from the default generator shared by the replicated layers.
                rng = tensor_parallel.get_cuda_rng_tracker().fork()
            with rng:
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal,
                    scale=self.softmax_scale,
                )
            sq, b = out.shape[2], out.shape[0]
            return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    return SDPACoreAttention


_SDPA = None


def sdpa_core_attention_cls():
    """The :class:`SDPACoreAttention` class (built lazily so importing this is cheap)."""
    global _SDPA
    if _SDPA is None:
        _SDPA = _sdpa_class()
    return _SDPA


def local_layer_spec():
    """Megatron-local GPT layer spec (RMSNorm, SwiGLU MLP) with SDPA core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = sdpa_core_attention_cls()
    return spec


def te_layer_spec():
    """Transformer Engine GPT layer spec (fused layer-norm + linear, TE attention, FP8)."""
    if not te_available():
        raise RuntimeError("the TE layer spec needs CUDA and transformer_engine installed")
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec()


def layer_spec(use_te: bool | None = None):
    """TE spec when ``use_te`` (default: when available), otherwise the local SDPA spec."""
    if use_te is None:
        use_te = te_available()
    return te_layer_spec() if use_te else local_layer_spec()
