"""The model inside Megatron's wrappers, and its checkpoint view.

Training wraps a built stage in Megatron ``DistributedDataParallel`` (and, in half
precision, ``Float16Module``); each keeps the wrapped model in ``.module``. Code that
needs the model's own attributes (``config``, ``language_model``, parameters) or its
conversion-plan names (``checkpoint_module()`` of
:class:`~sophiavl_mcore.models.qwen2_5_vl.Qwen25VLModel`) unwraps here.
"""

from __future__ import annotations

import torch

__all__ = ["checkpoint_view", "unwrap_model"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The innermost module under ``.module`` wrappers (``model`` itself when bare).

    Stops at a model that has ``checkpoint_module`` (the built Qwen2.5-VL stage).
    """
    while not hasattr(model, "checkpoint_module") \
            and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def checkpoint_view(model: torch.nn.Module) -> torch.nn.Module:
    """The unwrapped model's ``checkpoint_module()`` view (state-dict names are the
    conversion plan's), or the unwrapped model when it has none (a plain GPTModel)."""
    core = unwrap_model(model)
    return core.checkpoint_module() if hasattr(core, "checkpoint_module") else core
