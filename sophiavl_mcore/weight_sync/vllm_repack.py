"""Re-pack only what a sync wrote: CPU GEMM layers of an in-process vLLM model.

vLLM's CPU linear layers keep a packed copy of their weight for oneDNN (and drop the
plain ``weight``); that kernel is 2-3x faster than a GEMM on the plain weight, so the
default in-place sync keeps it and re-packs each written layer once, with vLLM's own
``process_weights_after_loading`` of that layer, as soon as the layer is complete:

* before the load, every packed layer the sync writes gets a *staging* ``weight``
  parameter (same class and loader attributes as vLLM's, from its reload metadata) whose
  storage is taken from a pool only when the layer's first write arrives;
* the layer's ``weight_loader`` is wrapped: it counts the elements vLLM's own loader
  copies (q/k/v and gate/up shards, rollout-TP slices) and, once the whole weight is
  written, runs the layer's post-processing (a fresh oneDNN handle from the staging
  weight; vLLM drops the plain weight again) and returns the storage to the pool;
* layers the sync writes only partly are first filled from their packed kernel
  (``cpu_linear(I) = W^T``, exact) and re-packed when the load ends.

Extra memory: one staging buffer per weight shape in flight (normally one layer), plus
the new packed copy of the layer being re-packed. Embeddings / LM heads keep their plain
weight in vLLM: they are written in place and re-packed the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from sophiavl_mcore.weight_sync.vllm_access import (
    original_loader,
    packed_kernel_weight,
    weight_reload_meta,
)

logger = logging.getLogger(__name__)


class StagingPool:
    """Reusable plain-weight buffers, by (shape, dtype): no page faults after the first sync."""

    def __init__(self) -> None:
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        free = self._free.get((tuple(shape), dtype))
        return free.pop() if free else torch.empty(shape, dtype=dtype)

    def give(self, buf: torch.Tensor) -> None:
        self._free.setdefault((tuple(buf.shape), buf.dtype), []).append(buf)

    @property
    def nbytes(self) -> int:
        """Bytes held by idle buffers."""
        return sum(b.numel() * b.element_size() for bufs in self._free.values() for b in bufs)


class _Staged:
    """One packed layer being written in this sync."""

    def __init__(self, module: torch.nn.Module, param: torch.Tensor, original_weight: torch.Tensor,
                 loader: Callable, covered: bool, shape: tuple[int, ...]) -> None:
        self.module = module
        self.param = param  # the parameter vLLM's loader writes into
        self.original_weight = original_weight  # what to put back if nothing was written
        self.loader = loader
        self.covered = covered
        self.shape = shape
        self.loaded = 0
        self.buffer: torch.Tensor | None = None  # pooled storage (dropped-weight layers)


class Repacker:
    """Stages, counts and re-packs the CPU GEMM layers one sync writes."""

    def __init__(self) -> None:
        self.pool = StagingPool()
        self._staged: dict[int, _Staged] = {}
        self.repacked = 0

    def stage(self, module: torch.nn.Module, covered: bool) -> None:
        """Give ``module`` a writable plain weight whose writes are counted.

        ``covered``: this sync writes every element (else the weight is first read
        back from the packed kernel).
        """
        if id(module) in self._staged:
            return
        weight = module.weight
        if weight.numel() > 0:  # vLLM kept the plain weight (embedding / LM head)
            param, shape = weight, tuple(weight.shape)
        else:
            param, shape = _staging_param(module), _full_shape(module)
            module.weight = param
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        loader = getattr(param, "weight_loader", default_weight_loader)
        staged = _Staged(module, param, weight, loader, covered, shape)
        param.weight_loader = self._counting_loader(staged)
        self._staged[id(module)] = staged

    def _counting_loader(self, staged: _Staged) -> Callable:
        from vllm.model_executor.model_loader.reload.meta import CopyCounter

        def staged_loader(param: torch.Tensor, loaded_weight: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if param.numel() == 0:
                self._attach_buffer(staged)
            with CopyCounter() as counter:
                out = staged.loader(param, loaded_weight, *args, **kwargs)
            staged.loaded += counter.copied_numel
            if staged.covered and staged.loaded >= param.numel():
                self.finish(staged.module)
            return out

        staged_loader.__name__ = "staged_loader"
        return staged_loader

    def _attach_buffer(self, staged: _Staged) -> None:
        module = staged.module
        buf = self.pool.take(staged.shape, staged.param.dtype)
        if not staged.covered:  # keep the elements this sync does not write
            weight = staged.original_weight
            buf.copy_(packed_kernel_weight(module, weight, staged.shape[1], weight.dtype))
        staged.buffer = buf
        staged.param.data = buf

    def finish(self, module: torch.nn.Module) -> None:
        """Re-pack ``module`` with vLLM's own post-processing (if it was written)."""
        staged = self._staged.pop(id(module), None)
        if staged is None:
            return
        staged.param.weight_loader = staged.loader
        if staged.loaded == 0:  # nothing arrived: put vLLM's parameter back
            module.weight = staged.original_weight
        else:
            module.quant_method.process_weights_after_loading(module)
            self.repacked += 1
        if staged.buffer is not None and module.weight is not staged.param:
            # vLLM dropped the plain weight again (packed): the storage is free
            staged.param.data = torch.empty(0, dtype=staged.buffer.dtype)
            self.pool.give(staged.buffer)

    def finish_all(self) -> None:
        """Re-pack every layer still staged (partly written ones; after a failure)."""
        for staged in list(self._staged.values()):
            self.finish(staged.module)

    @property
    def pending(self) -> int:
        return len(self._staged)


def _full_shape(module: torch.nn.Module) -> tuple[int, int]:
    """[N, K] of a linear layer's plain weight on this rollout-TP rank."""
    return (int(module.output_size_per_partition), int(module.input_size_per_partition))


def _staging_param(module: torch.nn.Module) -> torch.Tensor:
    """An empty parameter with vLLM's class and loader attributes for ``module.weight``."""
    from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

    meta = weight_reload_meta(module)
    param = torch.empty(0, dtype=meta.dtype)
    param.__class__ = meta.__class__
    param.__dict__ = meta.__dict__.copy()  # restore_layer_refs edits it in place
    restore_layer_refs(param, module)
    param.weight_loader = original_loader(param.weight_loader)
    return param

