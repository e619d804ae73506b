"""Run a function on N spawned gloo-ready processes (tests and benches).

``launch(fn, nprocs, *args)`` spawns ``nprocs`` processes with RANK/WORLD_SIZE/MASTER_*
set, calls ``fn(rank, *args)`` in each (``fn`` must be a module-level function), and
returns the per-rank return values (must be picklable). A failure in any rank raises in
the parent with that rank's traceback. One launch can run many checks, which matters on a
2-core machine where each spawn costs seconds of imports.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sophiavl_mcore.parallel.init import free_port

__all__ = ["free_port", "launch"]


def _entry(rank: int, fn: Callable, nprocs: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    result = fn(rank, *args)
    Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def launch(fn: Callable, nprocs: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``nprocs`` spawned processes; per-rank results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _entry, args=(fn, nprocs, free_port(), out, args), nprocs=nprocs,
            join=True, start_method="spawn",
        )
        return [pickle.loads(Path(out, f"rank{r}.pkl").read_bytes()) for r in range(nprocs)]


def kill_when_ready(target: Callable, args: tuple, ready: Path, timeout_s: float = 120) -> Path:
    """Run ``target(*args)`` in a spawned process, wait until it has written ``ready``
    (the path of the file it completed before pausing), SIGKILL it there and return that
    path: a crash at a chosen point of a write, for tests of what survives one."""
    import multiprocessing
    import signal
    import time

    proc = multiprocessing.get_context("spawn").Process(target=target, args=args)
    proc.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if not proc.is_alive():
                raise AssertionError(f"child died early with exit code {proc.exitcode}")
            if time.monotonic() > deadline:
                raise AssertionError("child never reached the pause")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
    if proc.exitcode != -signal.SIGKILL:
        raise AssertionError(f"child exited with {proc.exitcode}, not by SIGKILL")
    return Path(ready.read_text())
