"""Rank-filtered console logging and namespaced metrics (TensorBoard + a console line).

Only rank 0 logs at INFO by default; other ranks log WARNING and above, so a 64-rank job
prints one line per event, not 64. Metric names must start with one of
:data:`METRIC_NAMESPACES` so dashboards stay organised.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

METRIC_NAMESPACES: tuple[str, ...] = ("train/", "rollout/", "reward/", "timing/", "perf/", "data/", "val/", "weight_sync/")


def current_rank() -> int:
    """Global rank from torch.distributed if initialised, else from the launcher's env."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, all_ranks_level: int) -> None:
        super().__init__()
        self.rank = rank
        self.all_ranks_level = all_ranks_level

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.rank == 0 or record.levelno >= self.all_ranks_level


def setup_logging(level: int = logging.INFO, all_ranks_level: int = logging.WARNING) -> None:
    """Configure the root logger once per process; INFO from rank 0, warnings from all."""
    rank = current_rank()
    handler = logging.StreamHandler()
    handler.addFilter(_RankFilter(rank, all_ranks_level))
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)


def check_metric_names(metrics: Mapping[str, Any]) -> None:
    """Raise if a metric name is outside the agreed namespaces."""
    bad = [name for name in metrics if not name.startswith(METRIC_NAMESPACES)]
    if bad:
        raise ValueError(f"metric name(s) {bad} must start with one of {list(METRIC_NAMESPACES)}")


class MetricsWriter:
    """Writes scalar metrics to TensorBoard (rank 0 only) and formats a console line.

    ``log_dir=None`` keeps metrics in memory only (``history``), for tests and dry runs.
    """

    def __init__(self, log_dir: str | Path | None, rank: int | None = None) -> None:
        self.rank = current_rank() if rank is None else rank
        self.history: list[tuple[int, dict[str, float]]] = []
        self._writer = None
        if log_dir is not None and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record scalar metrics for ``step``; non-finite values are written as they are."""
        check_metric_names(metrics)
        scalars = {name: float(value) for name, value in metrics.items()}
        self.history.append((step, scalars))
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, global_step=step)

    def add_text(self, step: int, tag: str, text: str) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, global_step=step)

    def add_image(self, step: int, tag: str, image: Any) -> None:
        """``image``: uint8 array [H, W, 3] (or a PIL image)."""
        if self._writer is not None:
            import numpy as np

            self._writer.add_image(tag, np.asarray(image, dtype=np.uint8), global_step=step,
                                   dataformats="HWC")

    def add_histogram(self, step: int, tag: str, values: Any) -> None:
        if self._writer is not None:
            self._writer.add_histogram(tag, values, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def console_line(step: int, metrics: Mapping[str, float], keys: tuple[str, ...]) -> str:
    """A compact one-line summary of the chosen metrics, e.g. for the per-step log."""
    parts = [f"step {step}"]
    for key in keys:
        if key in metrics:
            value = metrics[key]
            parts.append(f"{key.split('/', 1)[-1]}={value:.4g}" if math.isfinite(value) else f"{key}=nan")
    return " | ".join(parts)
