"""perf/ figures cover the whole step; the update phase alone is named as such."""

from __future__ import annotations

import pytest

from sophiavl_mcore.trainer.grpo.metrics import step_perf


def test_whole_step_throughput_by_hand() -> None:
    metrics = {"timing/step_s": 4.0, "timing/rollout_s": 0.5, "train/input_tokens": 12000.0,
               "rollout/response_len_mean": 20.0, "rollout/responses": 128.0,
               "perf/train_tokens_per_s": 12000.0}  # the update phase took 1 s of the 4
    got = step_perf(metrics, world=2)
    assert got["perf/tokens_per_s"] == pytest.approx(3000.0)
    assert got["perf/tokens_per_s_per_rank"] == pytest.approx(1500.0)
    assert got["perf/rollout_tokens_per_s"] == pytest.approx(20 * 128 / 0.5)


def test_missing_phases_give_no_figure() -> None:
    assert step_perf({"timing/step_s": 0.0, "train/input_tokens": 5.0}, world=1) == {}
