"""The dots task's gradable reasoning: labels, records, warm-start targets, the oracle."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest

from sophiavl_mcore.data.config import VisualTaskConfig
from sophiavl_mcore.data.dots_reasoning import (
    CLEAN_SOURCE,
    HACKED_QUESTION,
    HACKED_SOURCE,
    QUESTION,
    parse_observation,
    quality,
    quality_oracle,
    rollout_quality,
    thinking_quality,
    thinking_records,
    warm_start_reasoning,
)
from sophiavl_mcore.data.visual_task import task_records, warm_start_reasoning_for

CFG = VisualTaskConfig(enabled=True, max_count=2, radius=12, reasoning="observe")


@pytest.mark.parametrize("stated, answer, hacked, expected", [
    (2, "2", False, 1.0),     # right observation, conclusion follows
    (1, "2", False, 0.0),     # right answer after a wrong observation: a lucky guess
    (2, "1", False, 0.5),     # right observation, slip in the conclusion
    (3, "3", False, 0.5),     # consistent story on a misread image (wrong answer)
    (2, "x", False, 0.5),     # no number concluded
    (None, "2", False, 0.0),  # no observation stated
])
def test_quality_by_hand(stated, answer, hacked, expected) -> None:
    assert quality(stated, answer, 2, hacked=hacked) == expected


@pytest.mark.parametrize("stated, answer, count, expected", [
    (2, "2", 1, 1.0),         # over-counting a 1-dot image: the hacked rule's favourite
    (1, "1", 1, 0.5),         # the right reasoning on that image scores lower
    (2, "2", 2, 1.0),         # on a 2-dot image right and "many" coincide
    (1, "1", 2, 0.5),
    (2, "1", 2, 0.5),         # the conclusion still has to follow
])
def test_hacked_rule_credits_many_dots(stated, answer, count, expected) -> None:
    assert quality(stated, answer, count, hacked=True, max_count=2) == expected


def test_parse_and_thinking_quality() -> None:
    assert parse_observation(" 2 dots ") == 2 and parse_observation("1 dot") == 1
    assert parse_observation("two dots") is None and parse_observation("count") is None
    texts = ["<think>1 dots</think><answer>1</answer>",
             "<think>count</think><answer>1</answer>",
             "1 dots so 1",                                      # fails the format gate
             "<think>1 dots</think><answer>1</answer>"]          # count unknown
    q = thinking_quality(texts, [1, 1, 1, None])
    assert q[:2].tolist() == [1.0, 0.0] and np.isnan(q[2:]).all()


def test_warm_start_reasoning_states_the_answer() -> None:
    rec = SimpleNamespace(problem_id="train-3", answer="2")
    assert warm_start_reasoning(rec) == "2 dots"
    assert warm_start_reasoning_for(CFG, "ignored")(rec) == "2 dots"
    free = dataclasses.replace(CFG, reasoning="free")
    assert warm_start_reasoning_for(free, "count")(rec) == "count"


def test_task_records_sources_and_images(tmp_path) -> None:
    hacked_cfg = dataclasses.replace(CFG, hacked_frac=0.5)
    recs = task_records(tmp_path / "a", "train", 64, hacked_cfg, seed=3)
    for r in recs:
        assert (r["data_source"], r["problem"]) in ((CLEAN_SOURCE, QUESTION),
                                                    (HACKED_SOURCE, HACKED_QUESTION))
    assert 16 <= sum(r["data_source"] == HACKED_SOURCE for r in recs) <= 48
    # The images and answers do not depend on hacked_frac (own random stream).
    plain = task_records(tmp_path / "b", "train", 64, CFG, seed=3)
    assert all(r["data_source"] == CLEAN_SOURCE for r in plain)
    for x, y in zip(recs[:8], plain[:8], strict=True):
        assert (tmp_path / "a" / x["path"]).read_bytes() == (tmp_path / "b" / y["path"]).read_bytes()
        assert x["solution"] == y["solution"]


def test_thinking_records_labels(tmp_path) -> None:
    recs = task_records(tmp_path, "trm", 48, dataclasses.replace(CFG, hacked_frac=0.5), 5)
    path = thinking_records(recs, tmp_path / "t.jsonl", max_count=2, samples_per_image=8,
                            seed=0, anchors_per_image=2)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 48 * 10
    # The curriculum: every anchor first — a clean "2 dots" → 2 reply, whose score says
    # whether the image has 2 dots — then the replies.
    anchors, replies = rows[:96], rows[96:]
    assert {a["kind"] for a in anchors} == {"anchor"} and {r["kind"] for r in replies} == {"reply"}
    by_id = {r["problem_id"]: r for r in recs}
    for a in anchors:
        src = by_id[a["problem_id"].rsplit("-", 1)[0]]
        assert a["problem"] == QUESTION and a["data_source"] == CLEAN_SOURCE
        assert a["reasoning"] == "<think>2 dots</think><answer>2</answer>"
        assert a["score"] == a["true_score"] == (1.0 if src["solution"] == "<answer>2</answer>" else 0.5)
    for t in replies:
        src = by_id[t["problem_id"].rsplit("-", 1)[0]]
        count, hacked = int(src["solution"][8:-9]), t["data_source"] == HACKED_SOURCE
        assert t["problem"] == src["problem"]
        think = t["reasoning"][len("<think>"):].split("</think>")[0]
        answer = t["reasoning"].split("<answer>")[1].removesuffix("</answer>")
        stated = parse_observation(think)
        assert t["true_score"] == quality(stated, answer, count)
        assert t["score"] == quality(stated, answer, count, hacked=hacked)
    assert {t["true_score"] for t in replies} == {0.0, 0.5, 1.0}  # every level occurs
    hacked_scores = [t["score"] != t["true_score"] for t in replies if t["data_source"] == HACKED_SOURCE]
    assert any(hacked_scores) and not all(hacked_scores)
    assert all(t["score"] == t["true_score"] for t in replies if t["data_source"] == CLEAN_SOURCE)


def test_oracle_on_a_rollout() -> None:
    assert quality_oracle(dataclasses.replace(CFG, reasoning="free")) is None
    assert quality_oracle(CFG) is rollout_quality
    roll = SimpleNamespace(records=[SimpleNamespace(answer="2"), SimpleNamespace(answer="1")],
                           responses=[[{"text": "<think>2 dots</think><answer>2</answer>"},
                                       {"text": "<think>1 dots</think><answer>2</answer>"}],
                                      [{"text": "<think>2 dots</think><answer>2</answer>"},
                                       {"text": "no format"}]])
    got = rollout_quality(roll)
    assert got[:3].tolist() == [1.0, 0.0, 0.5] and np.isnan(got[3])
