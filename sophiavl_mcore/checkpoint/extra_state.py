"""Module extra states (``*_extra_state``) restored without unpickling checkpoint bytes.

Transformer Engine layers keep their FP8 scaling state as *extra state*: ``get_extra_state``
returns ``pickle.dumps(state)`` as a uint8 tensor and ``set_extra_state`` calls
``pickle.loads`` on whatever tensor it is given. ``torch.load(weights_only=True)`` of the
checkpoint is therefore not enough: handing a checkpoint's extra-state tensor to
``load_state_dict`` would let a crafted checkpoint run code.

:func:`sanitize_extra_states` is the only way a checkpoint's extra states reach a module.
Each non-empty tensor is decoded by :class:`RestrictedUnpickler`, which builds only

- tensors (``torch._utils._rebuild_tensor_v2``; storages through ``torch.load`` with
  ``weights_only=True``), ``torch.Size``, ``torch.device``, dtypes;
- plain containers and scalars (dict, list, tuple, set, str, bytes, numbers, bool,
  None, ``collections.OrderedDict``);
- the dataclasses, enums and named tuples of ``transformer_engine.common.recipe`` (the
  FP8 recipe TE stores beside its scales);

and refuses any other global with :class:`UnsafeExtraStateError` naming the tensor.
The decoded value is then pickled again by this process (bytes that hold nothing but
those objects) and that tensor is what the module receives. Empty tensors (TE without
FP8) pass unchanged. A module whose extra state is a non-pickle tensor cannot be
restored this way and is refused too (no module in this project has one).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import importlib
import io
import pickle
from collections.abc import Mapping
from typing import Any

import torch

from sophiavl_mcore.checkpoint.st_io import CheckpointError

_TE_RECIPE_MODULE = "transformer_engine.common.recipe"


class UnsafeExtraStateError(CheckpointError):
    """A checkpoint's extra state holds something other than tensors and plain data."""


def _load_storage_weights_only(data: bytes) -> Any:
    # torch.storage._load_from_bytes does torch.load(weights_only=False): never that.
    return torch.load(io.BytesIO(data), weights_only=True)


def _allowed_global(module: str, name: str) -> Any:
    """The object a pickle may name, or None when it is not on the allow-list."""
    fixed = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _load_storage_weights_only,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "object"): object,
    }
    if (module, name) in fixed:
        return fixed[(module, name)]
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module == _TE_RECIPE_MODULE or module.startswith(_TE_RECIPE_MODULE + "."):
        try:
            obj = getattr(importlib.import_module(module), name, None)
        except ImportError:
            return None
        # Classes whose unpickling only sets fields (no custom __reduce__ logic to run).
        if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
                                      or (issubclass(obj, tuple) and hasattr(obj, "_fields"))):
            return obj
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals listed in the module docstring."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_global(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which is not allowed")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"uses a persistent id {pid!r:.60}, which is not allowed")


def decode_extra_state(name: str, tensor: torch.Tensor, where: str = "") -> Any:
    """The value pickled in an extra-state tensor, decoded by :class:`RestrictedUnpickler`.

    Raises :class:`UnsafeExtraStateError` naming ``where`` and the tensor.
    """
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    try:
        return RestrictedUnpickler(io.BytesIO(raw)).load()
    except Exception as err:  # any failure to decode is a refusal, never a fallback
        prefix = f"{where}: " if where else ""
        raise UnsafeExtraStateError(
            f"{prefix}extra state {name!r} ({len(raw)} bytes) {err}; a checkpoint's extra state "
            "may hold only tensors, plain containers and Transformer Engine FP8 recipes"
        ) from None


def sanitize_extra_states(extra: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Extra-state tensors safe to pass to ``load_state_dict``: each decoded by the
    restricted unpickler and re-encoded by this process (empty tensors unchanged)."""
    out: dict[str, Any] = {}
    for name, value in extra.items():
        if not isinstance(value, torch.Tensor):
            raise UnsafeExtraStateError(f"{where}: extra state {name!r} is a "
                                        f"{type(value).__name__}, expected a tensor")
        if value.numel() == 0:
            out[name] = value
            continue
        decoded = decode_extra_state(name, value, where)
        out[name] = torch.frombuffer(bytearray(pickle.dumps(decoded)), dtype=torch.uint8)
    return out
