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
