"""Rank filtering, metric namespaces and TensorBoard output."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sophiavl_mcore.logging import MetricsWriter, _RankFilter, check_metric_names, console_line


def _record(level: int) -> logging.LogRecord:
    return logging.LogRecord("x", level, __file__, 1, "msg", None, None)


def test_rank_filter_keeps_info_on_rank0_only() -> None:
    assert _RankFilter(0, logging.WARNING).filter(_record(logging.INFO))
    assert not _RankFilter(3, logging.WARNING).filter(_record(logging.INFO))
    assert _RankFilter(3, logging.WARNING).filter(_record(logging.ERROR))


def test_metric_namespaces_are_enforced() -> None:
    check_metric_names({"reward/gamma_mean": 1.0, "timing/rollout_s": 2.0})
    with pytest.raises(ValueError, match="gamma_mean"):
        check_metric_names({"gamma_mean": 1.0})


def test_tensorboard_events_are_written(tmp_path: Path) -> None:
    pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path, rank=0)
    writer.log(1, {"train/loss": 0.5})
    writer.log(2, {"train/loss": 0.25})
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.5), (2, 0.25)]


def test_non_zero_rank_writes_nothing(tmp_path: Path) -> None:
    writer = MetricsWriter(tmp_path, rank=1)
    writer.log(1, {"train/loss": 0.5})
    writer.close()
    assert list(tmp_path.iterdir()) == []
    assert writer.history == [(1, {"train/loss": 0.5})]


def test_console_line() -> None:
    assert console_line(3, {"train/loss": 0.5, "reward/mean": float("nan")}, ("train/loss", "reward/mean")) == (
        "step 3 | loss=0.5 | reward/mean=nan")
