"""The reward stage asks the TRM once per distinct reply of a group, and every copy of
that reply gets the score: a client that records what it was asked and scores each
reply by a fixed table written here (not by the code under test)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sophiavl_mcore.data.records import Record
from sophiavl_mcore.rewards.config import RewardsConfig
from sophiavl_mcore.rewards.stage import score_groups
from sophiavl_mcore.rewards.thinking import ThinkingRequest, ThinkingRewardClient, ThinkingScores
from sophiavl_mcore.rollout.batch import StepBatch

A = "<think>2 dots</think><answer>2</answer>"
B = "<think>1 dots</think><answer>1</answer>"
C = "<think>2 dots</think><answer>1</answer>"
TABLE = {A: 0.9, B: 0.2, C: 0.5}


class _Recording(ThinkingRewardClient):
    def __init__(self) -> None:
        self.asked: list[tuple[str, str, int]] = []

    def score(self, requests: Sequence[ThinkingRequest]) -> ThinkingScores:
        self.asked += [(r.question, r.reasoning, id(r.images[0])) for r in requests]
        return ThinkingScores(np.array([TABLE[r.reasoning] for r in requests], np.float32), {})


def _record(i: int) -> Record:
    return Record(f"p{i}", f"How many dots? ({i})", "image", "numerical", (), "<answer>2</answer>",
                  "2", f"/img{i}.png", "dots")


def test_each_distinct_reply_of_a_group_is_asked_once_and_every_copy_scored() -> None:
    records = [_record(0), _record(1)]
    texts = [[A, A, B, A], [A, C, C, B]]  # group 1 repeats A too: asked again (other image)
    images = [object(), object()]
    client = _Recording()
    batch = StepBatch.grouped(4, records, [0, 1], texts=[t for g in texts for t in g],
                              images=images, group_columns={"generated": np.ones(2)})
    score_groups(batch, client, RewardsConfig(), step=0, total_steps=10)
    assert sorted(client.asked) == sorted([
        ("How many dots? (0)", A, id(images[0])), ("How many dots? (0)", B, id(images[0])),
        ("How many dots? (1)", A, id(images[1])), ("How many dots? (1)", C, id(images[1])),
        ("How many dots? (1)", B, id(images[1]))])
    np.testing.assert_allclose(batch.columns["thinking"], [0.9, 0.9, 0.2, 0.9, 0.9, 0.5, 0.5, 0.2], atol=1e-6)
    assert batch.scalars["reward/trm_requests"] == 5
    assert batch.scalars["reward/trm_repeats_frac"] == 1 - 5 / 8
