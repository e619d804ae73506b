"""The per-step diagnostics that tell learning the answer from learning the format."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sophiavl_mcore.trainer.metrics import answer_metrics


def _reply(answer: str) -> str:
    return f"<think>count</think><answer>{answer}</answer>"


def test_collapsed_policy_shows_one_answer_per_group() -> None:
    groups = [[_reply("1")] * 4, [_reply("1")] * 3 + ["no format at all"]]
    m = answer_metrics(groups)
    assert m["rollout/answer_top_frac"] == 1.0
    assert m["rollout/answer_distinct"] == 1.0


def test_malformed_replies_are_left_out_and_empty_steps_give_nothing() -> None:
    m = answer_metrics([[_reply("1"), _reply("2"), "<answer>3</answer>"]])
    assert m == {"rollout/answer_top_frac": 0.5, "rollout/answer_distinct": 2.0}
    assert answer_metrics([["garbage"], []]) == {}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.sampled_from("1234"), min_size=1, max_size=8), min_size=1, max_size=6))
def test_matches_a_direct_count(groups: list[list[str]]) -> None:
    m = answer_metrics([[_reply(a) for a in g] for g in groups])
    flat = [a for g in groups for a in g]
    top = max(flat.count(a) for a in set(flat)) / len(flat)
    assert np.isclose(m["rollout/answer_top_frac"], top)
    assert np.isclose(m["rollout/answer_distinct"], np.mean([len(set(g)) for g in groups]))
