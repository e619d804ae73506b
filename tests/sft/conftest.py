"""Fixtures for the SFT tests: one tiny Qwen2.5-VL + 32 thinking records per session, and
a launcher for N gloo processes (spawned; each runs ``fn(rank, *args)``)."""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, nprocs: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
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
    """Run ``fn(rank, *args)`` on ``nprocs`` spawned processes; per-rank return values."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_entry, args=(fn, nprocs, _free_port(), out, args), nprocs=nprocs,
                           join=True, start_method="spawn")
        return [pickle.loads(Path(out, f"rank{r}.pkl").read_bytes()) for r in range(nprocs)]


@pytest.fixture(scope="session")
def sft_case(tmp_path_factory) -> dict[str, Path]:
    """``model``: tiny Qwen2.5-VL dir; ``data``: 32 thinking records with PNG images."""
    import _case

    root = tmp_path_factory.mktemp("sft_case")
    return {"model": _case.build_model(root), "data": _case.write_records(root), "root": root}
