"""The step batch and the exchange's arithmetic, against values written out by hand:
group/response selection, concatenation, the wire format and the transfer plan."""

from __future__ import annotations

import numpy as np
import pytest

from sophiavl_mcore.data.records import Record
from sophiavl_mcore.rollout.batch import StepBatch
from sophiavl_mcore.rollout.exchange import Transfer, pack, plan_transfers, unpack
from sophiavl_mcore.rollout.layout import EngineLayout


def _record(g: int) -> Record:
    return Record(f"p{g}", f"q{g}", "image", "numerical", (), "<answer>1</answer>", "1", None, "s")


def _batch() -> StepBatch:
    """3 groups × 2: group 1 was not generated (one pad token per row)."""
    return StepBatch.grouped(
        2, [_record(g) for g in (10, 11, 12)], [10, 11, 12],
        group_columns={"generated": np.array([1.0, 0.0, 1.0]), "gamma": np.array([1.0, 0.5, 0.25])},
        columns={"advantage": np.array([0.5, -0.5, 0.0, 0.0, 1.5, -1.5])},
        images=["img10", None, "img12"],
        prompt_ids=[np.array([1, 2, 3]), np.array([0]), np.array([7])],
        response_ids=[np.array([4]), np.array([5, 6]), np.array([0]), np.array([0]),
                      np.array([8, 9, 10]), np.array([11])],
        logprobs=[np.array([-0.1], np.float32), np.array([-0.2, -0.3], np.float32),
                  np.zeros(1, np.float32), np.zeros(1, np.float32),
                  np.array([-1.0, -2.0, -3.0], np.float32), np.array([-4.0], np.float32)],
        texts=["a", "b", "", "", "c", "d"], scalars={"reward/trm_requests": 3.0, "x": 1.0})


def test_grouped_batch_knows_its_groups() -> None:
    b = _batch()
    assert len(b) == 6 and b.num_groups == 3
    assert b.group_of.tolist() == [0, 0, 1, 1, 2, 2]
    assert b.generated.tolist() == [True, True, False, False, True, True]
    assert b.texts_by_group() == [["a", "b"], ["", ""], ["c", "d"]]


def test_select_keeps_the_groups_of_the_chosen_responses_in_first_seen_order() -> None:
    part = _batch().select([5, 1, 4])
    assert part.group_id.tolist() == [12, 10]
    assert part.group_of.tolist() == [0, 1, 0]
    assert part.texts == ["d", "b", "c"] and part.images == ["img12", "img10"]
    assert part.group_columns["gamma"].tolist() == [0.25, 1.0]
    assert part.columns["advantage"].tolist() == [-1.5, -0.5, 1.5]
    assert [p.tolist() for p in part.prompt_ids] == [[7], [1, 2, 3]]


def test_select_groups_and_concat_undo_each_other() -> None:
    b = _batch()
    first, rest = b.select_groups([2]), b.select_groups([0, 1])
    assert first.texts == ["c", "d"] and rest.texts == ["a", "b", "", ""]
    both = StepBatch.concat([rest, first])
    assert both.group_id.tolist() == [10, 11, 12] and both.group_of.tolist() == [0, 0, 1, 1, 2, 2]
    assert both.texts == b.texts and both.columns["advantage"].tolist() == b.columns["advantage"].tolist()
    assert both.scalars == {"reward/trm_requests": 6.0, "x": 1.0}  # counters add, the rest is kept
    empty = b.select_groups([])
    assert len(empty) == 0 and empty.num_groups == 0


def test_mismatched_columns_are_refused_with_the_sizes() -> None:
    with pytest.raises(ValueError, match=r"texts has 2 entries, expected one per response \(4\)"):
        StepBatch.grouped(2, [_record(0), _record(1)], [0, 1], texts=["a", "b"])
    b = _batch()
    with pytest.raises(ValueError, match=r"column 'reward' has 2 values, expected 6"):
        b.add_columns(reward=np.zeros(2))


def test_wire_format_round_trip_and_size() -> None:
    b = _batch()
    part = b.select([1, 2, 3, 4])  # the end of group 10, all of 11, the start of 12
    ints, floats = pack(part)
    # g=3, k=4; ΣP = 3 + 1 + 1; ΣR = 2 + 1 + 1 + 3
    assert ints.numel() == 4 + 2 * 3 + 2 * 4 + 5 + 7 and floats.numel() == 4 + 7
    records = {10: _record(10), 11: _record(11), 12: _record(12)}
    back = unpack(ints, floats, records, n=2)
    assert back.group_id.tolist() == [10, 11, 12] and back.group_of.tolist() == [0, 1, 1, 2]
    assert back.group_columns["generated"].tolist() == [1.0, 0.0, 1.0]
    assert [p.tolist() for p in back.prompt_ids] == [[1, 2, 3], [0], [7]]
    assert [r.tolist() for r in back.response_ids] == [[5, 6], [0], [0], [8, 9, 10]]
    assert [lp.tolist() for lp in back.logprobs] == [[pytest.approx(-0.2), pytest.approx(-0.3)],
                                                     [0.0], [0.0], [-1.0, -2.0, -3.0]]
    assert back.columns["advantage"].tolist() == [-0.5, 0.0, 0.0, 1.5]
    assert [r.problem_id for r in back.records] == ["p10", "p11", "p12"]


def test_transfer_plan_for_two_engines_of_two_ranks_and_dp_two() -> None:
    # 4 ranks, engines of 2 ranks (0-1, 2-3), 4 prompts × n=2: engine 0 makes responses
    # 0-3, engine 1 makes 4-7. TP=2 training: DP rank of ranks 0,1 is 0 and of 2,3 is 1,
    # so each DP share is exactly one engine's output and every rank copies its own rows.
    layout = EngineLayout(world=4, rtp=2, prompts=4, n=2)
    assert plan_transfers(layout, [0, 0, 1, 1], dp=2) == [
        Transfer(0, 0, 0, 4), Transfer(1, 1, 0, 4), Transfer(2, 2, 4, 8), Transfer(3, 3, 4, 8)]


def test_transfer_plan_when_shares_cross_engines() -> None:
    # Same engines, DP=4 over ranks in order: shares of 2 responses. Ranks 0,1 are in
    # engine 0 and take rows 0-1, 2-3 from themselves; ranks 2,3 take 4-5, 6-7 likewise.
    layout = EngineLayout(world=4, rtp=2, prompts=4, n=2)
    assert plan_transfers(layout, [0, 1, 2, 3], dp=4) == [
        Transfer(0, 0, 0, 2), Transfer(1, 1, 2, 4), Transfer(2, 2, 4, 6), Transfer(3, 3, 6, 8)]
    # DP ranks reversed: rank 0 trains rows 6-7 of engine 1 (ranks 2, 3), served by
    # [2, 3][0 % 2] = 2; rank 3 trains rows 0-1 of engine 0, served by [0, 1][3 % 2] = 1.
    assert plan_transfers(layout, [3, 2, 1, 0], dp=4) == [
        Transfer(2, 0, 6, 8), Transfer(3, 1, 4, 6), Transfer(0, 2, 2, 4), Transfer(1, 3, 0, 2)]
    # One engine of 4 ranks, DP=2 over ranks [0, 1, 0, 1]: everyone is in the engine.
    one = EngineLayout(world=4, rtp=4, prompts=4, n=2)
    assert plan_transfers(one, [0, 1, 0, 1], dp=2) == [
        Transfer(0, 0, 0, 4), Transfer(1, 1, 4, 8), Transfer(2, 2, 0, 4), Transfer(3, 3, 4, 8)]
