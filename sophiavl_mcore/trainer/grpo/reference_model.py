"""Frozen reference policy for the KL penalty, optionally offloaded between uses.

The reference is a second model of the same layout as the policy (same TP/PP stage on
this rank), holding the *initial* policy weights: built by the caller's builder, filled
from the policy (:meth:`ReferenceModel.from_policy`) or from a checkpoint the builder
loads, then frozen (``requires_grad=False``, eval mode, never wrapped in DDP, so no
gradient buffers and no optimizer state exist for it).

Why a builder and not ``copy.deepcopy(policy)``: Megatron modules hold process-group
handles and DDP hooks that cannot (and must not) be duplicated; a fresh build gets its
own clean modules on the same parallel groups.

**Offload.** With ``offload=True`` the parameters and buffers live in (pinned) host
memory between uses and are copied to the accelerator only for
:meth:`ReferenceModel.compute_logprobs` (one host→device copy of this rank's shard per
step; the host copies are allocated once and reused). On a CPU-only machine the model
already lives in host memory, so offloading is a no-op there (nothing is moved).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from sophiavl_mcore.models.unwrap import unwrap_model
from sophiavl_mcore.trainer.grpo.rollout_batch import RolloutBatch
from sophiavl_mcore.trainer.grpo.step import TokenLogProbs, compute_logprobs

logger = logging.getLogger(__name__)

__all__ = ["ReferenceModel"]


def _tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from ((n, b) for n, b in module.named_buffers() if b is not None)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}


class ReferenceModel:
    """A frozen copy of one rank's policy stage that computes reference log-probs.

    Args:
        module: this rank's built model stage (weights already set); it is frozen here.
        offload: move it to host memory between uses (see the module docstring).
    """

    def __init__(self, module: torch.nn.Module, *, offload: bool = False) -> None:
        self.module = unwrap_model(module)
        self.module.requires_grad_(False)
        self.module.eval()
        self.device = next(self.module.parameters()).device
        self.offload_enabled = offload and self.device.type != "cpu"
        self._host: dict[str, torch.Tensor] = {}
        if offload and not self.offload_enabled:
            logger.info("reference model: offload requested but the model lives on the CPU "
                        "already; nothing to move")
        self.offload()

    @classmethod
    def from_policy(cls, policy: torch.nn.Module, build: Callable[[], torch.nn.Module], *,
                    offload: bool = False) -> ReferenceModel:
        """Build a fresh stage with ``build()`` and copy the policy's current weights."""
        module = build()
        src, dst = _state(unwrap_model(policy)), _state(unwrap_model(module))
        if set(src) != set(dst):
            raise ValueError("reference build does not match the policy: reference-only "
                             f"{sorted(set(dst) - set(src))[:5]}, policy-only "
                             f"{sorted(set(src) - set(dst))[:5]}")
        with torch.no_grad():
            for name, t in dst.items():
                if t.shape != src[name].shape:
                    raise ValueError(f"reference tensor {name} has shape {tuple(t.shape)}, the "
                                     f"policy's {tuple(src[name].shape)}")
                t.copy_(src[name])
        return cls(module, offload=offload)

    # -- placement ---------------------------------------------------------------------

    def offload(self) -> None:
        """Parameters and buffers → pinned host memory (no-op unless offload is enabled)."""
        if not self.offload_enabled:
            return
        for name, t in _tensors(self.module):
            if t.device.type == "cpu":
                continue
            host = self._host.get(name)
            if host is None:
                host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                self._host[name] = host
            host.copy_(t.detach(), non_blocking=True)
            t.data = host
        torch.cuda.synchronize()  # the host copies must be complete before they are read

    def onload(self) -> None:
        """Back to the accelerator for a forward pass (no-op unless offload is enabled)."""
        if not self.offload_enabled:
            return
        for _, t in _tensors(self.module):
            if t.device != self.device:
                t.data = t.data.to(self.device, non_blocking=True)

    @contextmanager
    def on_device(self) -> Iterator[torch.nn.Module]:
        """The module on its device for the duration of the block, offloaded afterwards."""
        self.onload()
        try:
            yield self.module
        finally:
            self.offload()

    # -- use ---------------------------------------------------------------------------

    def compute_logprobs(self, batch: RolloutBatch, micro_batch_size: int,
                         temperature: float = 1.0, **kwargs: bool | int) -> TokenLogProbs | None:
        """Reference log-probs of ``batch``'s responses (see :func:`compute_logprobs`)."""
        with self.on_device() as module:
            return compute_logprobs(module, batch, micro_batch_size, temperature, **kwargs)
