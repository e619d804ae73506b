"""In-place weight updates of an in-process vLLM engine (the fast sync paths).

Why not vLLM's ``reload_weights``: its layer-wise reload moves every layer to the meta
device, materialises fresh tensors, loads into them, re-runs
``process_weights_after_loading`` and copies the result back into the old storage. On
CPU the unquantized linear method's post-processing re-packs every weight for oneDNN
(``dispatch_cpu_unquantized_gemm``: a fresh packed copy per layer, the plain weight
dropped). On the bench model (1.24 GB float32, 2 cores) that reload runs at ~0.03-0.09x
memcpy; building the oneDNN handles alone costs ~0.05x memcpy (fresh memory page
faults + the re-layout), so no path that keeps vLLM's packed CPU kernels can reach
0.5x memcpy there.

What :class:`InplaceUpdater` does (engine rank, uni executor, in-process):

1. *Prepare* every layer the sync writes. Layers whose kernel reads ``weight`` (every
   layer on GPU; norms, convs, already-live layers on CPU) need nothing. A CPU layer
   with a packed copy is either
   - *staged for one re-pack* (default, ``live=False``, :mod:`vllm_repack`): vLLM's
     loader writes into a pooled plain weight and the layer's own
     ``process_weights_after_loading`` re-packs it as soon as it is complete, or
   - *made live* (``live=True``, :func:`make_live`): switched for good to vLLM's own
     fallback CPU GEMM (``torch.nn.functional.linear`` on the plain ``weight``, the
     branch vLLM takes when oneDNN is unavailable), with a quant-method subclass whose
     post-processing keeps that state, so vLLM's own full reload stays correct later.
     No re-pack ever: one copy per byte, but generation on CPU is slower where the
     packed kernel beats PyTorch's GEMM (x2.2 decode time on the bench's AMD EPYC).
   A layer this sync only partly writes (e.g. only ``q_proj`` of ``qkv_proj``) first
   gets its other rows back from the packed kernel (``cpu_linear(I) = W^T``, exact).
2. *Write.* The HF-named stream goes through the model's own ``load_weights`` (vLLM's
   name mapping, q/k/v and gate/up packing, vocab padding, rollout-TP slicing), which
   copies each tensor straight into its parameter.
3. *Invalidate.* Everything computed from the old weights is dropped: prefix KV
   blocks, the scheduler's and the worker's vision-encoder caches and the front-end
   multimodal cache (all of them: dropping only one side leaves the scheduler
   believing an encoder output is cached that the worker no longer has, which is the
   ``Encoder cache miss`` failure mode).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from sophiavl_mcore.weight_sync.vllm_access import (
    engine_model,
    engine_worker,
    fused_target,
    kernel_is_live,
    live_linear,
    original_loader,
    packed_kernel_weight,
    weight_reload_meta,
)
from sophiavl_mcore.weight_sync.vllm_repack import Repacker

logger = logging.getLogger(__name__)


def _live_method_types() -> tuple[type, type]:
    """Subclasses of vLLM's unquantized linear / embedding methods that keep kernels live."""
    global _LIVE_TYPES
    if _LIVE_TYPES is None:
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
        from vllm.platforms import current_platform

        def process(self, layer: torch.nn.Module) -> None:
            # vLLM's own full reload calls this after loading: keep reading the plain
            # weight instead of re-packing it (the weight stays the same tensor).
            if current_platform.is_cpu():
                _point_kernel_at_weight(layer)

        linear = type("LiveUnquantizedLinearMethod", (UnquantizedLinearMethod,),
                      {"process_weights_after_loading": process, "__doc__": "Never re-packs."})
        embed = type("LiveUnquantizedEmbeddingMethod", (UnquantizedEmbeddingMethod,),
                     {"process_weights_after_loading": process, "__doc__": "Never re-packs."})
        _LIVE_TYPES = (linear, embed)
    return _LIVE_TYPES


_LIVE_TYPES: tuple[type, type] | None = None


def _point_kernel_at_weight(layer: torch.nn.Module) -> None:
    weight = layer.weight
    bias = getattr(layer, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.dtype != weight.dtype:
        # vLLM's SGL path widened the bias to float32 for its packed kernel.
        bias.data = bias.data.to(weight.dtype)
    layer.cpu_linear = live_linear


def make_live(module: torch.nn.Module, overwritten: bool) -> bool:
    """Switch one linear / embedding layer to a CPU GEMM that reads its plain ``weight``.

    Args:
        module: a vLLM layer with an unquantized linear or embedding method.
        overwritten: this sync writes every element of the weight (then a re-created
            weight starts from zeros instead of being read back from the kernel).

    Returns True when the layer was converted (False: live already).
    """
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    if kernel_is_live(module):
        return False
    method = module.quant_method
    live_linear_t, live_embed_t = _live_method_types()
    if isinstance(method, UnquantizedLinearMethod):
        live_t = live_linear_t
    elif isinstance(method, UnquantizedEmbeddingMethod):
        live_t = live_embed_t
    else:
        raise NotImplementedError(f"{type(module).__name__}: in-place update of {type(method).__name__}")
    if module.weight.numel() == 0:  # packed and dropped by vLLM: re-create the plain weight
        from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
        from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

        meta = weight_reload_meta(module)
        with torch.device(module.weight.device):
            # materialise first: restore_layer_refs edits the tensor's attributes in place
            weight = restore_layer_refs(materialize_meta_tensor(meta), module)
        weight.weight_loader = original_loader(weight.weight_loader)
        with torch.no_grad():
            if overwritten:
                weight.zero_()
            else:
                weight.copy_(packed_kernel_weight(module, module.weight, weight.shape[1], weight.dtype))
        module.weight = weight  # a Parameter subclass with vLLM's loader attributes
    live = copy.copy(method)
    live.__class__ = live_t
    module.quant_method = live
    _point_kernel_at_weight(module)
    return True


def unwrap_loaders(module: torch.nn.Module) -> int:
    """Remove vLLM's layer-wise reload wrappers from ``module``'s parameter loaders.

    vLLM's reload wraps the loaders of the tensors it registers from its reload
    metadata, and the metadata objects keep those wrappers afterwards; a wrapped
    loader outside a reload drops every write ("excessive loading"), silently.
    Returns the number of loaders unwrapped.
    """
    count = 0
    for param in module.parameters(recurse=False):
        loader = getattr(param, "weight_loader", None)
        original = original_loader(loader)
        if original is not loader:
            param.weight_loader = original
            count += 1
    return count


class InplaceUpdater:
    """Writes HF-named tensors into a live in-process vLLM model (engine rank).

    Args:
        engine: a :class:`~sophiavl_mcore.rollout.vllm_engine.VllmRolloutEngine`
            (in-process, uni executor).
        live: on CPU, switch written layers to the GEMM on the plain weight (no re-pack;
            fastest sync, slower generation where the packed kernel is faster) instead
            of re-packing each written layer once per sync (:mod:`vllm_repack`).
    """

    def __init__(self, engine: Any, live: bool = False) -> None:
        self.engine = engine
        self.live = live
        self.repacker = Repacker()
        self.worker = engine_worker(engine)
        self.model = engine_model(engine)
        self.mapper = getattr(self.model, "hf_to_vllm_mapper", None)
        self.packed: dict[str, list[str]] = dict(getattr(self.model, "packed_modules_mapping", {}) or {})
        self.converted = 0
        self._owners: dict[str, tuple[str, list[str]]] = {}

    @staticmethod
    def unsupported_reason(engine: Any) -> str | None:
        """Why ``engine`` cannot be updated in place (None: it can)."""
        try:
            worker = engine_worker(engine)
        except AttributeError as err:
            return f"not an in-process uni-executor vLLM engine ({err})"
        if worker.vllm_config.model_config.quantization is not None:
            return f"quantized model ({worker.vllm_config.model_config.quantization})"
        if worker.vllm_config.lora_config is not None:
            return "LoRA is enabled"
        return None

    def owner(self, hf_name: str) -> tuple[str, list[str]]:
        """(vLLM module path, HF names that together fill that module's parameter)."""
        if hf_name not in self._owners:
            module_path, _, siblings = fused_target(hf_name, self.mapper, self.packed)
            self._owners[hf_name] = (module_path, siblings)
        return self._owners[hf_name]

    def prepare(self, names: Iterable[str]) -> int:
        """Get every layer that ``names`` write into ready for in-place writes: a live
        layer as is; a CPU-packed one made live (``live``) or staged for one re-pack.
        Returns the number of layers converted or staged."""
        names = set(names)
        done: set[str] = set()
        changed = 0
        for hf_name in sorted(names):
            path, siblings = self.owner(hf_name)
            if path in done:
                continue
            done.add(path)
            module = self.model.get_submodule(path)
            if unwrap_loaders(module):
                # expected after a vLLM reload that did not load this layer (it wraps the
                # loaders of e.g. ``bias`` and never unwraps them): such a loader would
                # drop our writes silently
                logger.info("%s: removed a stale vLLM reload wrapper from its loaders", path)
            if not hasattr(module, "cpu_linear") or kernel_is_live(module):
                continue
            covered = all(s in names for s in siblings)
            if self.live:
                changed += make_live(module, overwritten=covered)
            else:
                self.repacker.stage(module, covered)
                changed += 1
        if self.live and changed:
            self.converted += changed
            logger.info("in-place weight sync: %d layer(s) now read their live weights", changed)
        return changed

    def load(self, weights: Iterable[tuple[str, torch.Tensor]], names: Iterable[str],
             version: int | None) -> int:
        """Write ``weights`` (HF names, full tensors) into the live model; returns the
        engine's new ``policy_version``. ``names``: every HF name the stream will yield."""
        from vllm.config import set_current_vllm_config

        engine = self.engine
        pending = engine.llm.llm_engine.get_num_unfinished_requests()
        if pending:
            # Their KV and encoder outputs come from the old weights, and resetting the
            # encoder cache under running requests desyncs scheduler and worker.
            raise RuntimeError(f"{pending} request(s) still in flight on the engine; a sync "
                               "must not land mid-generation (nothing was written)")
        if getattr(engine, "sleeping", False):
            engine.wake_up(tags=["weights"])  # the KV cache may stay asleep
        count = {"n": 0}

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            for item in weights:
                count["n"] += 1
                yield item

        try:
            with set_current_vllm_config(self.worker.vllm_config), torch.no_grad():
                try:
                    self.prepare(names)
                    self.model.load_weights(counted())
                finally:
                    # partly written layers; after a failure, leave every layer packed
                    self.repacker.finish_all()
        finally:
            # Any write, even a partial one, makes every weight-derived cache stale.
            engine.invalidate_caches()
        if count["n"] == 0:
            raise ValueError("in-place load got an empty stream; nothing was loaded")
        engine.policy_version = engine.policy_version + 1 if version is None else int(version)
        return engine.policy_version


def live_report(model: torch.nn.Module) -> Mapping[str, int]:
    """``{"live": n, "packed": m}`` over the layers with a CPU GEMM (diagnostics)."""
    out = {"live": 0, "packed": 0}
    for module in model.modules():
        if hasattr(module, "cpu_linear"):
            out["live" if kernel_is_live(module) else "packed"] += 1
    return out
