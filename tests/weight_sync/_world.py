"""A gloo world that lives for the whole test session, with the vLLM engine in rank 0.

Why not ``tests/dist``'s ``launch``: that spawns fresh processes per call, and the
engine must be built once per session (about a minute on 2 cores). Here ``nprocs``
spawned ranks start once; rank 0 builds the engine *before* the process group exists
(then releases vLLM's one-rank default group, see
``sophiavl_mcore.weight_sync.vllm_access``), all ranks join one gloo world, and then
serve commands: ``world.run(fn, *args)`` calls the module-level ``fn(rank, ctx, *args)``
on every rank (``ctx["engine"]`` on rank 0) and returns the per-rank results. A rank's
exception comes back as that rank's traceback; a hang ends at ``timeout_s``. With
``spmd=True`` the world is built as training builds it: process group first, then an
SPMD engine on every rank (``rollout.spmd.build_spmd_engine``).
"""

from __future__ import annotations

import datetime
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from sophiavl_mcore.testing.multiproc import free_port


def _rank_main(rank: int, nprocs: int, port: int, engine_kwargs: dict, spmd: bool,
               cmd_q, res_q) -> None:
    os.environ.update(OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    ctx: dict[str, Any] = {}
    try:
        from sophiavl_mcore.rollout import RolloutConfig, SamplingConfig

        cfg = RolloutConfig(sampling=SamplingConfig(n=1, max_tokens=4), **engine_kwargs)
        if rank == 0 and not spmd:
            from sophiavl_mcore.rollout.vllm_engine import VllmRolloutEngine
            from sophiavl_mcore.weight_sync.vllm_access import release_engine_default_group

            ctx["engine"] = VllmRolloutEngine(cfg)
            ctx["released_vllm_group"] = release_engine_default_group()
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=3))
        if spmd:  # the trainer's order: world first, then every rank's engine (rollout TP 1)
            from sophiavl_mcore.rollout.layout import EngineLayout
            from sophiavl_mcore.rollout.spmd import build_spmd_engine

            ctx["engine"] = build_spmd_engine(cfg, EngineLayout(world=nprocs, rtp=1, prompts=nprocs, n=1))
        res_q.put((rank, "ready", None))
    except BaseException:
        res_q.put((rank, "error", traceback.format_exc()))
        return
    while True:
        cmd = cmd_q.get()
        if cmd is None:
            break
        fn, args = cmd
        try:
            res_q.put((rank, "ok", fn(rank, ctx, *args)))
        except BaseException:
            res_q.put((rank, "error", traceback.format_exc()))
    if spmd:
        from sophiavl_mcore.rollout.spmd import close_spmd_engine

        close_spmd_engine(ctx.get("engine"))
    elif "engine" in ctx:
        from sophiavl_mcore.weight_sync.vllm_access import close_colocated_engine

        close_colocated_engine(ctx["engine"])
    dist.destroy_process_group()


class EngineWorld:
    """``nprocs`` persistent gloo ranks; rank 0 holds a ``VllmRolloutEngine`` built before
    the world, or (``spmd``) every rank holds its own SPMD engine (rollout TP 1) built in
    the world, as training builds them."""

    def __init__(self, nprocs: int, engine_kwargs: dict, start_timeout_s: float = 600,
                 spmd: bool = False) -> None:
        mpctx = mp.get_context("spawn")
        self.nprocs = nprocs
        self.cmd = [mpctx.Queue() for _ in range(nprocs)]
        self.res = mpctx.Queue()
        port = free_port()
        self.procs = [mpctx.Process(target=_rank_main,
                                    args=(r, nprocs, port, engine_kwargs, spmd, self.cmd[r], self.res))
                      for r in range(nprocs)]
        for p in self.procs:
            p.start()
        self._collect("start", start_timeout_s, expect="ready")

    def _collect(self, what: str, timeout_s: float, expect: str = "ok") -> list[Any]:
        out: dict[int, Any] = {}
        errors = []
        while len(out) + len(errors) < self.nprocs:
            try:
                rank, kind, value = self.res.get(timeout=timeout_s)
            except queue.Empty:
                self.close(force=True)
                raise TimeoutError(f"{what}: no answer from some rank within {timeout_s} s "
                                   f"(answered: {sorted(out)}); world killed") from None
            if kind == expect:
                out[rank] = value
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                if expect == "ready":
                    self.close(force=True)
                    break
        if errors:
            raise RuntimeError(f"{what} failed:\n" + "\n".join(errors))
        return [out[r] for r in range(self.nprocs)]

    def run(self, fn: Callable, *args: Any, timeout_s: float = 300) -> list[Any]:
        """``fn(rank, ctx, *args)`` on every rank; per-rank results in rank order."""
        for q in self.cmd:
            q.put((fn, args))
        return self._collect(getattr(fn, "__name__", "command"), timeout_s)

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self.cmd:
                q.put(None)
            for p in self.procs:
                p.join(timeout=60)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
