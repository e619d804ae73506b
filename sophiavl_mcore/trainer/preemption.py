"""Preemption: a signal asks the run to checkpoint and stop at the end of the current step.

Slurm signals a job before killing it: ``scontrol requeue`` / ``scancel`` / preemption
send SIGTERM (then SIGKILL after ``KillWait``), and ``#SBATCH --signal=B:USR1@T`` sends
the batch shell SIGUSR1 ``T`` seconds before the time limit, which the sbatch template
forwards to the job step. A rank that gets either signal only sets a flag: stopping
inside a collective would hang the other ranks, and a half-finished step would change
what the next checkpoint means. At the end of each step the ranks agree on the flag
(a MAX all-reduce, so one signalled rank is enough), save a checkpoint and leave the loop.

``<output_dir>/run_state.json`` tells the launcher what happened:
``{"status": "preempted" | "complete", "step": N}`` (written atomically by rank 0; the
sbatch template reads its ``status`` with a three-line inline parse).
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from sophiavl_mcore.atomic import atomic_write_text

logger = logging.getLogger(__name__)

RUN_STATE_FILE = "run_state.json"
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    """Signal handlers that record a stop request; :meth:`agreed` is the collective check.

    Use as a context manager so that the previous handlers come back afterwards.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> PreemptionWatcher:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only a flag: logging or I/O inside a handler can deadlock on held locks.
        self.received = signal.Signals(signum)

    def agreed(self) -> bool:
        """Collective over the default group: True when any rank received a signal."""
        local = self.received is not None
        if not (dist.is_available() and dist.is_initialized()):
            return local
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend() == "nccl" else torch.device("cpu"))
        flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def write_run_state(output_dir: str | Path, status: str, step: int) -> Path:
    """Atomically write ``run_state.json`` (call on one rank)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_STATE_FILE
    atomic_write_text(path, json.dumps({"status": status, "step": step}) + "\n")
    return path
