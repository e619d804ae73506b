"""The one place where torch.distributed and Megatron ``parallel_state`` are initialised."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket

import torch

from sophiavl_mcore.parallel import cpu_compat
from sophiavl_mcore.parallel.config import LayoutError, ParallelConfig
from sophiavl_mcore.parallel.layout import stage_layer_counts, validate_layout

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ParallelInfo:
    """What a rank knows about the layout after :func:`initialize_parallel`.

    ``layers_per_stage`` is ``None`` when the model dimensions were not given (even
    split then, decided by Megatron from the model config).
    """

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str
    device: torch.device
    sequence_parallel: bool
    layers_per_stage: tuple[int, ...] | None
    seed: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def cpu_mode(self) -> bool:
        return self.device.type == "cpu"


def _resolve_backend(cfg: ParallelConfig) -> str:
    cuda = torch.cuda.is_available()
    if cfg.backend == "auto":
        return "nccl" if cuda else "gloo"
    if cfg.backend == "nccl" and not cuda:
        raise LayoutError("parallel.backend=nccl but CUDA is not available; use auto or gloo")
    return cfg.backend


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (MASTER_PORT, local servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # A lone process (tests, tools) gets a one-rank group so parallel_state works.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ["RANK"], os.environ["WORLD_SIZE"] = "0", "1"
    torch.distributed.init_process_group(
        backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
    )


def initialize_parallel(
    cfg: ParallelConfig,
    *,
    num_layers: int | None = None,
    num_heads: int | None = None,
    num_query_groups: int | None = None,
) -> ParallelInfo:
    """Validate the layout, init torch.distributed + Megatron parallel_state, seed RNGs.

    The layout is validated before any process group exists when the world size is
    known from the environment (``WORLD_SIZE``), and again against the live group.
    Model dimensions are optional; with them, heads/groups/layers are checked too.
    On a machine without CUDA, the CPU compatibility layer is applied first.

    Returns:
        ParallelInfo for this rank.
    """
    from megatron.core import parallel_state, tensor_parallel

    backend = _resolve_backend(cfg)
    if cfg.sequence_parallel and backend != "nccl":
        raise LayoutError("parallel.sequence_parallel is GPU-only (needs NCCL/CUDA)")
    # Without model dimensions only the world-size arithmetic can be checked.
    heads = num_heads if num_heads is not None else cfg.tp
    groups = num_query_groups if num_query_groups is not None else cfg.tp
    if num_layers is not None:
        layers = num_layers
    else:
        layers = sum(cfg.layers_per_stage) if cfg.layers_per_stage else cfg.pp
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None:
        validate_layout(cfg, int(env_world), layers, heads, groups)

    if backend == "gloo":
        cpu_compat.apply()
    elif "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    _init_process_group(backend, cfg.timeout_minutes)
    world = torch.distributed.get_world_size()
    dp = validate_layout(cfg, world, layers, heads, groups)

    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() != cfg.tp
            or parallel_state.get_pipeline_model_parallel_world_size() != cfg.pp
        ):
            raise LayoutError(
                "parallel_state already initialised with tp="
                f"{parallel_state.get_tensor_model_parallel_world_size()}, pp="
                f"{parallel_state.get_pipeline_model_parallel_world_size()}; asked tp={cfg.tp}, "
                f"pp={cfg.pp}; call destroy_parallel() first"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tp,
            pipeline_model_parallel_size=cfg.pp,
            distributed_timeout_minutes=cfg.timeout_minutes,
            # On CPU the default group already is gloo; a second set would only cost time.
            create_gloo_process_groups=backend != "gloo",
        )
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if backend == "gloo":
        cpu_compat.model_parallel_cpu_manual_seed(cfg.seed, tp_rank)
        device = torch.device("cpu")
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
        device = torch.device("cuda", torch.cuda.current_device())
    counts = (
        tuple(stage_layer_counts(num_layers, cfg.pp, cfg.layers_per_stage))
        if num_layers is not None
        else (tuple(cfg.layers_per_stage) if cfg.layers_per_stage else None)
    )
    info = ParallelInfo(
        rank=torch.distributed.get_rank(),
        world_size=world,
        tp=cfg.tp,
        pp=cfg.pp,
        dp=dp,
        tp_rank=tp_rank,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        backend=backend,
        device=device,
        sequence_parallel=cfg.sequence_parallel,
        layers_per_stage=counts,
        seed=cfg.seed,
    )
    if info.rank == 0:
        logger.info(
            "parallel: world=%d tp=%d pp=%d dp=%d backend=%s", world, cfg.tp, cfg.pp, dp, backend
        )
    return info


def destroy_parallel(keep_process_group: bool = False) -> None:
    """Tear down parallel_state and (unless kept) the default process group.

    ``keep_process_group=True`` allows a new layout in the same processes (tests).
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if not keep_process_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
