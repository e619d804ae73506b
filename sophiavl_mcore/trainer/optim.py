"""Megatron optimizer, DDP wrapping and LR schedule, usable on CPU/gloo as on GPU.

Public API::

    (the ``optim`` section, ``OptimConfig``, and its schedule checks are in ``trainer.config``)
    wrap_ddp(model, cfg) -> DistributedDataParallel
    build_optimizer(ddp_chunks, cfg, total_steps) -> (MegatronOptimizer, OptimizerParamScheduler)
    optimizer_step(optimizer, scheduler, clip_grad) -> StepResult

Why the pieces look the way they do:

* Megatron DDP (not torch DDP) so that gradients live in Megatron's contiguous buffers,
  the distributed optimizer can shard them, and ``finalize_model_grads`` averages the
  TP-replicated vision tower over TP (see :mod:`sophiavl_mcore.models.vision`).
* ``get_megatron_optimizer`` is asked for *no* extra gloo groups on CPU: there the
  default groups already are gloo, and :func:`~sophiavl_mcore.parallel.initialize_parallel`
  does not create the duplicate set (``use_gloo_process_groups=False``).
* megatron-core 0.16's optimizer creates tensors with ``device="cuda"``; the optimizer
  modules are added to the CPU compatibility layer (``cpu_compat.register_module``), so
  those factories land on the CPU. Its gradient clipping asserts
  ``grad.type() == "torch.cuda.FloatTensor"``; on CPU :func:`optimizer_step` therefore
  runs Megatron's own stages (``prepare_grads`` → ``get_grad_norm`` → clip →
  ``step_with_ready_grads``) and clips with the same formula in plain torch. On GPU it
  calls ``optimizer.step()`` unchanged.
* The distributed optimizer (ZeRO-1: optimizer state sharded over DP) is GPU-only:
  gloo itself would do (torch 2.13's gloo has ``reduce_scatter_tensor`` and
  ``all_gather_into_tensor``), but megatron-core 0.16's ``DistributedOptimizer`` rejects
  parameters whose ``type()`` is not ``torch.cuda.*Tensor``. Asking for it on CPU fails
  early with that reason; on GPU it is used when DP > 1.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING

import torch

from sophiavl_mcore.trainer.config import OptimConfig, check_schedule

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

logger = logging.getLogger(__name__)

# megatron-core modules with hard-coded ``device="cuda"`` reached by the optimizer path.
_OPTIMIZER_MODULES = (
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer_param_scheduler",
)


@dataclasses.dataclass
class StepResult:
    """One optimizer update: ``grad_norm`` is the global L2 norm before clipping."""

    grad_norm: float
    lr: float
    update_successful: bool


def _cpu_mode() -> bool:
    return not torch.cuda.is_available()


def _register_cpu_compat() -> None:
    from sophiavl_mcore.parallel import cpu_compat

    if _cpu_mode():
        for name in _OPTIMIZER_MODULES:
            cpu_compat.register_module(name)


def check_backend(cfg: OptimConfig) -> None:
    """Fail early for settings this machine cannot run (see the module docstring)."""
    if cfg.use_distributed_optimizer and _cpu_mode():
        raise ValueError(
            "optim.use_distributed_optimizer=true needs CUDA: megatron-core's "
            "DistributedOptimizer only accepts torch.cuda.*Tensor parameters; set it to false "
            "on CPU (the plain Megatron optimizer + DDP all-reduce is used then)")


def wrap_ddp(model: torch.nn.Module, cfg: OptimConfig) -> DistributedDataParallel:
    """Wrap one model chunk in Megatron DDP and hook up ``finalize_model_grads``.

    Gradients accumulate in fp32 buffers (``grad_reduce_in_fp32``) across micro-batches;
    the DP reduction happens once per step, inside the schedule's finalize call.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    check_backend(cfg)
    _register_cpu_compat()
    dp = parallel_state.get_data_parallel_world_size()
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer and dp > 1,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    return DistributedDataParallel(model.config, ddp_cfg, model)


def build_optimizer(ddp_chunks: list[DistributedDataParallel], cfg: OptimConfig, total_steps: int
                    ) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """Megatron Adam over ``ddp_chunks`` and its warmup + decay scheduler.

    Args:
        ddp_chunks: model chunks wrapped by :func:`wrap_ddp` (one per virtual stage).
        cfg: optimizer settings.
        total_steps: optimizer updates in the run (decay horizon when ``decay_steps`` is 0).

    Returns:
        ``(optimizer, scheduler)``; call :func:`optimizer_step` once per global batch.
    """
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if total_steps < 1:
        raise ValueError(f"optim: total_steps={total_steps} must be >= 1")
    decay_steps = check_schedule(cfg, total_steps)
    check_backend(cfg)
    _register_cpu_compat()
    params_dtype = next(ddp_chunks[0].parameters()).dtype
    dp = parallel_state.get_data_parallel_world_size()
    mcfg = OptimizerConfig(
        optimizer=cfg.optimizer,
        sgd_momentum=cfg.sgd_momentum,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer and dp > 1,
    )
    optimizer = get_megatron_optimizer(
        mcfg, ddp_chunks, use_gloo_process_groups=not _cpu_mode()
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=cfg.decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _clip_on_cpu(optimizer: MegatronOptimizer, clip_grad: float, grad_norm: float) -> None:
    """Megatron's ``clip_grad_by_total_norm_fp32`` formula, without its CUDA assert."""
    coeff = clip_grad / (grad_norm + 1.0e-6)
    if coeff >= 1.0:
        return
    for param in optimizer.get_parameters():
        if param.grad is not None:
            param.grad.mul_(coeff)


def optimizer_step(optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler,
                   clip_grad: float) -> StepResult:
    """Advance the schedule by one update, then clip and apply the update.

    The scheduler is stepped *first* so that update k (1-based) uses lr(k): with warmup
    the first update already moves the weights (Megatron's own loop would spend it at
    lr = 0). Returns the pre-clip global gradient norm and the LR used.
    """
    scheduler.step(increment=1)
    lr = float(optimizer.param_groups[0]["lr"])
    if not _cpu_mode():
        ok, grad_norm, _ = optimizer.step()
        return StepResult(float(grad_norm) if grad_norm is not None else math.nan, lr, bool(ok))
    found_inf = optimizer.prepare_grads()
    if found_inf:
        return StepResult(math.nan, lr, False)
    grad_norm = float(optimizer.get_grad_norm())
    if clip_grad > 0:
        _clip_on_cpu(optimizer, clip_grad, grad_norm)
    ok = optimizer.step_with_ready_grads()
    return StepResult(grad_norm, lr, bool(ok))
