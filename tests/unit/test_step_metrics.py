"""The per-step diagnostics that tell learning the answer from learning the format."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sophiavl_mcore.rollout.batch import StepBatch
from sophiavl_mcore.trainer.grpo.metrics import rollout_metrics
from sophiavl_mcore.trainer.grpo.step_data import answer_code


def _reply(answer: str) -> str:
    return f"<think>count</think><answer>{answer}</answer>"


def _rollout_metrics(groups: list[list[str]]) -> dict[str, float]:
    """The real ``rollout/answer_*`` metrics of replies (the step's gathered columns)."""
    from types import SimpleNamespace

    n = len(groups[0])
    flat = [t for g in groups for t in g]
    columns = {"length": np.full(len(flat), 3.0), "truncated": np.zeros(len(flat)),
               "answer": np.array([answer_code(t) for t in flat]), "engine": np.zeros(len(flat))}
    view = StepBatch.grouped(n, [None] * len(groups), range(len(groups)), columns=columns)
    layout = SimpleNamespace(num_engines=1)
    return {k: v for k, v in rollout_metrics(view, layout).items() if "answer" in k}


def test_collapsed_policy_shows_one_answer_per_group() -> None:
    groups = [[_reply("1")] * 4, [_reply("1")] * 3 + ["no format at all"]]
    assert _rollout_metrics(groups) == {"rollout/answer_top_frac": 1.0,
                                        "rollout/answer_distinct": 1.0}


def test_malformed_replies_are_left_out_and_empty_steps_give_nothing() -> None:
    # well-formed: 1, 2 (group 0) and 2, 2 (group 1) -> "2" is 3 of 4, distinct 2 and 1
    groups = [[_reply("1"), _reply("2"), "<answer>3</answer>"],
              [_reply("2"), _reply("2"), "garbage"]]
    assert _rollout_metrics(groups) == {"rollout/answer_top_frac": 0.75,
                                        "rollout/answer_distinct": 1.5}
    assert _rollout_metrics([["garbage", "also garbage"]]) == {}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.sampled_from("1234"), min_size=3, max_size=3), min_size=1, max_size=6))
def test_matches_a_direct_count(groups: list[list[str]]) -> None:
    m = _rollout_metrics([[_reply(a) for a in g] for g in groups])
    flat = [a for g in groups for a in g]
    top = max(flat.count(a) for a in set(flat)) / len(flat)
    assert np.isclose(m["rollout/answer_top_frac"], top)
    assert np.isclose(m["rollout/answer_distinct"], np.mean([len(set(g)) for g in groups]))


def test_thinking_metrics_overall_and_per_source_by_hand() -> None:
    import math
    from types import SimpleNamespace

    from sophiavl_mcore.trainer.grpo.metrics import thinking_metrics

    def view(thinking: np.ndarray) -> StepBatch:
        records = [SimpleNamespace(data_source=s) for s in "chc"]
        return StepBatch.grouped(
            2, records, range(3), columns={"outcome": outcome, "thinking": thinking,
                                           "true_quality": true_q},
            group_columns={"gamma": np.array([1.0, g1, 1.0]), "mu_correct": np.array([0.8, 0.3, 0.5]),
                           "mu_wrong": np.array([0.2, 0.9, np.nan]), "skipped": np.array([0, 0, 1.0])},
            scalars={"reward/annealing": 0.5})

    # 3 groups of 2: c, h, c. Group 1 (hacked): the wrong reply thought better, gamma < 1.
    outcome = np.array([1, 0, 1, 0, 1, 1], dtype=float)
    thinking = np.array([0.8, 0.2, 0.3, 0.9, np.nan, 0.5])
    true_q = np.array([1, 1 / 3, 1, 1 / 3, np.nan, 1])
    g1 = math.exp(-0.6)
    m = thinking_metrics(view(thinking))
    assert m["reward/thinking_mean"] == pytest.approx(0.54)
    assert m["reward/thinking_std"] == pytest.approx(math.sqrt(0.372 / 5))
    assert m["reward/thinking_scored_frac"] == pytest.approx(5 / 6)
    assert m["reward/gamma_mean"] == pytest.approx((2 + g1) / 3)
    assert m["reward/gamma_lt1_frac"] == pytest.approx(1 / 3)
    assert m["reward/mu_gap_mean"] == pytest.approx(0.0) and m["reward/paired_groups"] == 2
    assert m["reward/annealing"] == 0.5 and m["reward/skipped_groups_frac"] == pytest.approx(1 / 3)
    assert m["reward/thinking_true_mean"] == pytest.approx(11 / 15)
    c, h = "reward/source/c/", "reward/source/h/"
    assert m[c + "outcome_mean"] == 0.75 and m[h + "outcome_mean"] == 0.5
    assert m[c + "thinking_mean"] == pytest.approx(0.5)
    assert m[c + "thinking_std"] == pytest.approx(math.sqrt(0.06))
    assert m[h + "thinking_std"] == pytest.approx(0.3)
    assert m[c + "gamma_mean"] == 1.0 and m[c + "gamma_lt1_frac"] == 0.0
    assert m[h + "gamma_mean"] == pytest.approx(g1) and m[h + "gamma_lt1_frac"] == 1.0
    assert m[c + "mu_gap_mean"] == pytest.approx(0.6) and m[h + "mu_gap_mean"] == pytest.approx(-0.6)
    assert m[c + "trm_true_corr"] == pytest.approx(math.sqrt(3) / 2)
    assert m[h + "trm_true_corr"] == pytest.approx(-1.0)  # the hacked TRM ranks backwards
    # A constant thinking reward shows as zero spread.
    flat = thinking_metrics(view(np.full(6, 0.7)), by_source=False)
    assert flat["reward/thinking_std"] < 1e-12 and not any("source" in k for k in flat)
