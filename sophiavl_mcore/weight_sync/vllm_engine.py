"""vLLM-specific parts of the weight sync: what the engine expects, reading its weights
back, and living beside Megatron's process groups in one process.

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
an identity matrix (``cpu_linear(I_K) = W^T``), i.e. the weights the kernel really uses.

Process groups (CPU, colocated): the uni executor initialises a one-rank default
``torch.distributed`` group when none exists, and uses whatever default group exists
otherwise (which breaks on a multi-rank trainer world: vLLM would size its own groups by
it). What works: build the engine *before* the trainer's process group, then release
vLLM's one-rank default group (:func:`release_engine_default_group`); vLLM keeps its
group objects, which a one-rank engine never communicates over, and the trainer
initialises its own world (``initialize_parallel``) afterwards.
:func:`close_colocated_engine` shuts the engine down without touching the trainer's
groups.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
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


def engine_model(engine: Any) -> torch.nn.Module:
    """The in-process vLLM ``nn.Module`` of a :class:`VllmRolloutEngine` (uni executor)."""
    llm = engine.llm
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    return runner.get_model()


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
        name = self.mapper.map_name(hf_name) if self.mapper is not None else hf_name
        if name is None:
            raise KeyError(f"{hf_name}: the engine's name mapper drops this tensor")
        module_path, pname = name.rsplit(".", 1)
        parent, _, leaf = module_path.rpartition(".")
        for fused, members in self.packed.items():
            if leaf in members and [leaf] != members:
                idx = members.index(leaf)
                offset = 0
                for sibling in members[:idx]:
                    sib = hf_name.replace(f".{leaf}.", f".{sibling}.")
                    offset += self.hf_specs[sib][0]
                return f"{parent}.{fused}" if parent else fused, pname, offset, self.hf_specs[hf_name][0]
        return module_path, pname, 0, None

    def _param(self, module_path: str, pname: str, in_features: int) -> torch.Tensor:
        key = f"{module_path}.{pname}"
        if key in self._cache:
            return self._cache[key]
        module = self.model.get_submodule(module_path)
        param = getattr(module, pname)
        if param.numel() == 0 and pname == "weight" and hasattr(module, "cpu_linear"):
            # CPU kernels hold the packed weight; identity in -> W^T out.
            eye = torch.eye(in_features, dtype=param.dtype)
            with torch.no_grad():
                value = module.cpu_linear(eye, param, None).t().contiguous()
        else:
            value = param.detach()
        self._cache[key] = value
        return value

    def tensor(self, hf_name: str) -> torch.Tensor:
        """The engine's tensor for ``hf_name`` (vocab padding rows dropped)."""
        shape = tuple(self.hf_specs[hf_name])
        module_path, pname, first, rows = self.locate(hf_name)
        in_features = shape[1] if len(shape) == 2 else 1
        value = self._param(module_path, pname, in_features)
        if rows is not None:
            value = value[first:first + rows]
        if value.shape[0] > shape[0]:  # vLLM pads vocab rows
            value = value[: shape[0]]
        return value.reshape(shape)


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

    for name, value in list(vars(vps).items()):
        if isinstance(value, vps.GroupCoordinator):
            setattr(vps, name, None)
    original = vps.destroy_distributed_environment
    vps.destroy_distributed_environment = lambda: None
    try:
        engine.close()
    finally:
        vps.destroy_distributed_environment = original
