"""What a training checkpoint restores besides the weights: RNG streams, optimizer state,
and the model config a resume must match (used by :mod:`.training`)."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sophiavl_mcore.checkpoint.st_io import CheckpointError


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for run state: dataclasses, paths, numpy values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {value!r:.80} is not JSON-serialisable")


# ------------------------------------------------------------------ RNG


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (+ every CUDA device) generators and Megatron's tracker."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = _megatron_rng_tracker()
    if tracker is not None:
        state["megatron_tracker"] = tracker.get_states()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "megatron_tracker" in state:
        tracker = _megatron_rng_tracker()
        if tracker is None:
            raise CheckpointError("the checkpoint holds Megatron RNG tracker states but this "
                                  "process has no initialised tracker (initialize_parallel first)")
        tracker.set_states({k: v.clone() for k, v in state["megatron_tracker"].items()})


def _megatron_rng_tracker() -> Any:
    mrandom = sys.modules.get("megatron.core.tensor_parallel.random")
    if mrandom is None:
        return None
    tracker = getattr(mrandom, "_CUDA_RNG_STATE_TRACKER", None)
    if getattr(mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", False) and tracker is not None \
            and tracker.is_initialized():
        return tracker
    return None


# ------------------------------------------------------------------ optimizer / model config


def _inner_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _is_distributed_optimizer(opt: Any) -> bool:
    return hasattr(opt, "get_parameter_state_dp_reshardable")


def optimizer_state(optimizer: Any) -> list[dict[str, Any]]:
    """Each inner optimizer's state dict (+ a distributed optimizer's per-DP-rank
    parameter state, saved without a gather)."""
    out = []
    for opt in _inner_optimizers(optimizer):
        entry = {"state_dict": opt.state_dict()}
        if _is_distributed_optimizer(opt):
            entry["param_state"] = opt.get_parameter_state_dp_reshardable()
        out.append(entry)
    return out


def load_optimizer_state(optimizer: Any, saved: list[dict[str, Any]], where: Path) -> None:
    """Inverse of :func:`optimizer_state`; ``where`` names the file in errors."""
    inner = _inner_optimizers(optimizer)
    if len(inner) != len(saved):
        raise CheckpointError(f"{where}: holds {len(saved)} optimizer(s), this run has {len(inner)}")
    for opt, entry in zip(inner, saved, strict=True):
        opt.load_state_dict(entry["state_dict"])
        if "param_state" in entry:
            state = entry["param_state"]
            for key, per_dtype in state.items():
                if isinstance(key, int):  # buffers → dtype → buckets → params
                    for buckets in per_dtype.values():
                        for bucket in buckets:
                            for elem in bucket:
                                elem.setdefault("padding", False)
            opt.load_parameter_state_from_dp_reshardable(state)


def model_config(models: Mapping[str, torch.nn.Module], model_meta: Mapping[str, Any] | None
                 ) -> dict[str, Any]:
    """What must match between the saving and the loading run (beside the layout)."""
    cfg: dict[str, Any] = {}
    if model_meta is not None and "hf_config" in model_meta:
        cfg["hf_config"] = model_meta["hf_config"]
    for name, m in models.items():
        tc = getattr(m, "config", None)
        fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "kv_channels", "params_dtype")
        if tc is not None and all(hasattr(tc, f) for f in fields):
            cfg[name] = {f: str(getattr(tc, f)) for f in fields}
    return json.loads(json.dumps(cfg, default=json_default))


def dict_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: checkpoint … vs this run …`` for every differing leaf (dotted keys)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += dict_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: checkpoint {va!r} vs this run {vb!r}")
    return out
