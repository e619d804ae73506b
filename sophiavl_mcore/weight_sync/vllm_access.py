"""How the weight sync reaches into a live vLLM engine: what the engine expects, reading
its weights back, and living beside Megatron's process groups in one process.

Expected tensors: the HF names and full shapes the engine was built from, read from the
safetensors headers of its checkpoint directory (``RolloutConfig.model``). Those are the
names vLLM's loader accepts by construction (hub layout ``model.layers.*`` /
``visual.*`` or the transformers-5 layout ``model.language_model.*`` /
``model.visual.*``), and full shapes make the check independent of the rollout TP.

Read-back (debug compare): vLLM fuses q/k/v into ``qkv_proj`` and gate/up into
``gate_up_proj`` (the model's ``packed_modules_mapping``) and renames through its
``hf_to_vllm_mapper``; an HF tensor is compared with its row slice of the fused
parameter. On CPU, vLLM packs linear weights into oneDNN/SGL kernels and leaves an
empty ``weight`` parameter; such a weight is read back by running the layer's kernel on
an identity matrix (``cpu_linear(I_K) = W^T``), i.e. the weights the kernel really uses
(also where vLLM keeps both a ``weight`` and a packed copy: embeddings / LM head). After
an in-place sync (:mod:`~sophiavl_mcore.weight_sync.vllm_inplace`) kernels read the
plain ``weight`` and it is read directly.

Process groups (CPU, colocated): the uni executor initialises a one-rank default
``torch.distributed`` group when none exists, and uses whatever default group exists
otherwise (which breaks on a multi-rank trainer world: vLLM would size its own groups by
it). What works: build the engine *before* the trainer's process group, then release
vLLM's one-rank default group (:func:`release_engine_default_group`); vLLM keeps its
group objects, which a one-rank engine never communicates over, and the trainer
initialises its own world (``initialize_parallel``) afterwards.
:func:`close_colocated_engine` shuts the engine down without touching the trainer's
groups.

Layer helpers shared by :mod:`~sophiavl_mcore.weight_sync.vllm_repack` and
:mod:`~sophiavl_mcore.weight_sync.vllm_inplace` (which both build on this module, never
the other way round): which GEMM a CPU layer runs (:func:`kernel_is_live`,
:func:`packed_kernel_weight`) and vLLM's reload metadata of a packed weight
(:func:`weight_reload_meta`, :func:`original_loader`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_specs(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """``{HF name: full shape}`` of every tensor in a safetensors checkpoint directory."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files (engine checkpoint)")
    specs: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if not name.endswith(_IGNORED_SUFFIXES):
                    specs[name] = tuple(f.get_slice(name).get_shape())
    return specs


def engine_expected_specs(engine: Any) -> dict[str, tuple[int, ...]] | None:
    """What ``engine`` accepts, from the checkpoint it was built from (None if unknown)."""
    model_dir = getattr(getattr(engine, "cfg", None), "model", None)
    if not model_dir or not Path(model_dir).is_dir():
        return None
    return checkpoint_specs(model_dir)


def engine_worker(engine: Any) -> Any:
    """The in-process vLLM worker of a :class:`VllmRolloutEngine` (uni executor)."""
    return engine.llm.llm_engine.model_executor.driver_worker.worker


def engine_model(engine: Any) -> torch.nn.Module:
    """The in-process vLLM ``nn.Module`` of a :class:`VllmRolloutEngine` (uni executor)."""
    return engine_worker(engine).model_runner.get_model()


def fused_target(hf_name: str, mapper: Any, packed: Mapping[str, list[str]]) -> tuple[str, str, list[str]]:
    """Where an HF tensor lives in a vLLM model: (module path, parameter name, the HF
    names that fill that parameter in row order, ``hf_name`` among them).

    vLLM fuses q/k/v and gate/up (``packed_modules_mapping``); some models' name
    mappers already rename ``.k_proj`` to ``.qkv_proj`` (Qwen2), others leave the
    member name for the loader to fuse (Qwen2.5-VL): both end at the fused module.
    """
    name = mapper.map_name(hf_name) if mapper is not None else hf_name
    if name is None:
        raise KeyError(f"{hf_name}: the engine's name mapper drops this tensor")
    module_path, pname = name.rsplit(".", 1)
    parent, _, mapped_leaf = module_path.rpartition(".")
    hf_leaf = hf_name.rsplit(".", 2)[-2] if hf_name.count(".") >= 2 else ""
    for fused, members in packed.items():
        if hf_leaf in members and [hf_leaf] != members and mapped_leaf in (hf_leaf, fused):
            siblings = [hf_name.replace(f".{hf_leaf}.", f".{m}.") for m in members]
            return (f"{parent}.{fused}" if parent else fused), pname, siblings
    return module_path, pname, [hf_name]


def packed_kernel_weight(module: torch.nn.Module, weight: torch.Tensor, in_features: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] a packed CPU GEMM really uses: ``cpu_linear(I_K) = W^T`` (exact:
    each output is 1·w). ``weight``: the parameter handed to the kernel call."""
    eye = torch.eye(in_features, dtype=dtype)
    with torch.no_grad():
        return module.cpu_linear(eye, weight, None).t()


def live_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """CPU GEMM that reads the layer's plain ``weight`` [N, K] at every call: x [.., K] -> [.., N]."""
    return torch.nn.functional.linear(x, weight, bias)


def kernel_is_live(module: torch.nn.Module) -> bool:
    """Whether ``module``'s GEMM reads its ``weight`` parameter directly (always true off
    CPU for unquantized layers; on CPU only after
    :func:`~sophiavl_mcore.weight_sync.vllm_inplace.make_live`)."""
    if not hasattr(module, "cpu_linear"):
        return True
    return module.cpu_linear is live_linear and module.weight.numel() > 0


def weight_reload_meta(module: torch.nn.Module) -> torch.Tensor:
    """vLLM's reload metadata of ``module.weight`` (a meta tensor with the parameter's
    class, shape and loader attributes), kept when vLLM packed and dropped the weight."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    meta = get_layerwise_info(module).restore_metadata[0].get("weight")
    if meta is None:
        raise NotImplementedError(f"{type(module).__name__}: vLLM kept no reload metadata")
    return meta


def original_loader(loader: Callable | None) -> Callable | None:
    """``loader`` without vLLM's layer-wise reload wrappers."""
    while loader is not None and getattr(loader, "__name__", "") == "online_process_loader":
        loader = loader.__wrapped__
    return loader


class VllmReadBack:
    """Read the engine's current value of an HF-named tensor (rollout TP = 1)."""

    def __init__(self, model: torch.nn.Module, hf_specs: Mapping[str, tuple[int, ...]]) -> None:
        self.model = model
        self.hf_specs = hf_specs
        self.mapper = getattr(model, "hf_to_vllm_mapper", None)
        self.packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {}) or {})
        self._cache: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        self._cache.clear()

    def locate(self, hf_name: str) -> tuple[str, str, int, int | None]:
        """(module path, parameter name, first row, rows or None = all) in the vLLM model."""
        module_path, pname, siblings = fused_target(hf_name, self.mapper, self.packed)
        if len(siblings) == 1:
            return module_path, pname, 0, None
        offset = sum(self.hf_specs[s][0] for s in siblings[: siblings.index(hf_name)])
        return module_path, pname, offset, self.hf_specs[hf_name][0]

    def _values(self, module_path: str, pname: str, in_features: int) -> list[torch.Tensor]:
        key = f"{module_path}.{pname}"
        if key in self._cache:
            return self._cache[key]
        module = self.model.get_submodule(module_path)
        param = getattr(module, pname)
        values = [param.detach()] if param.numel() > 0 else []
        if pname == "weight" and hasattr(module, "cpu_linear") and not kernel_is_live(module):
            # The CPU kernel computes with its own packed copy, which must agree with a
            # kept ``weight`` too (embeddings / LM head).
            values.append(packed_kernel_weight(module, param, in_features, param.dtype).contiguous())
        self._cache[key] = values
        return values

    def views(self, hf_name: str) -> list[torch.Tensor]:
        """Every engine copy of ``hf_name`` that inference uses: the parameter (a view:
        writing to it writes the engine) and/or what the packed CPU kernel computes
        with; vocab padding rows dropped."""
        shape = tuple(self.hf_specs[hf_name])
        module_path, pname, first, rows = self.locate(hf_name)
        in_features = shape[1] if len(shape) == 2 else 1
        out = []
        for value in self._values(module_path, pname, in_features):
            if rows is not None:
                value = value[first:first + rows]
            if value.shape[0] > shape[0]:  # vLLM pads vocab rows
                value = value[: shape[0]]
            out.append(value.reshape(shape))
        return out

    def tensor(self, hf_name: str) -> torch.Tensor:
        """The engine's tensor for ``hf_name``: its parameter where one is kept, else
        the packed kernel's weight (see :meth:`views`)."""
        return self.views(hf_name)[0]


# ----------------------------------------------------------------- colocation helpers


def release_engine_default_group() -> bool:
    """Destroy the one-rank default process group vLLM created for its uni executor.

    Call right after building the engine and before the trainer's
    ``initialize_parallel``. Returns True when a group was released. Raises if the
    existing default group has more than one rank (then it is not vLLM's).
    """
    if not torch.distributed.is_initialized():
        return False
    size = torch.distributed.get_world_size()
    if size != 1:
        raise RuntimeError(
            f"the default process group has {size} ranks; build the engine before the "
            "trainer's process group (vLLM's uni executor would adopt it)"
        )
    torch.distributed.destroy_process_group()
    return True


def close_colocated_engine(engine: Any) -> None:
    """Shut an engine down after :func:`release_engine_default_group`.

    vLLM's shutdown destroys its group objects (released already) and then the default
    process group, which is now the trainer's: drop vLLM's group objects from its
    registry and keep its shutdown away from the default group while it runs.
    """
    from vllm.distributed import parallel_state as vps

    from sophiavl_mcore.rollout.spmd import keep_default_group

    for name, value in list(vars(vps).items()):
        if isinstance(value, vps.GroupCoordinator):
            setattr(vps, name, None)
    with keep_default_group():
        engine.close()
