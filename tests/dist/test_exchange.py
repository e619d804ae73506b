"""rollout.exchange.redistribute on four gloo processes: two engines of two ranks each
hand every data-parallel rank exactly its contiguous share, row for row, whatever the
DP ranks' order — checked against the rows' values written out here, and the bytes
received against the wire format's size."""

from __future__ import annotations

import numpy as np

N, PROMPTS = 2, 4  # samples per prompt, prompts per step: 8 responses, 4 per engine


def _prompt(g: int) -> list[int]:
    return [0] if g == 3 else [100 + g] * (g + 1)  # group 3 was not generated (one pad)


def _response(i: int) -> list[int]:
    return [0] if i // N == 3 else [i] * (1 + i % 3)


def _engine_batch(engine: int):  # noqa: ANN202 - a StepBatch, imported inside the process
    from sophiavl_mcore.data.records import Record
    from sophiavl_mcore.rollout.batch import StepBatch

    groups = [2 * engine, 2 * engine + 1]
    rows = [g * N + j for g in groups for j in range(N)]
    return StepBatch.grouped(
        N, [Record(f"p{g}", "q", "image", "numerical", (), "", "1", None, "s") for g in groups],
        groups, group_columns={"generated": np.array([float(g != 3) for g in groups])},
        columns={"advantage": np.array([i / 4 for i in rows])},
        prompt_ids=[np.array(_prompt(g)) for g in groups],
        response_ids=[np.array(_response(i)) for i in rows],
        logprobs=[np.full(len(_response(i)), -float(i), np.float32) for i in rows],
        texts=[""] * len(rows))


def _redistribute(rank: int, plans: list[tuple[list[int], int]]) -> list[dict[str, object]]:
    import torch.distributed as dist

    from sophiavl_mcore.data.records import Record
    from sophiavl_mcore.rollout.exchange import plan_transfers, redistribute
    from sophiavl_mcore.rollout.layout import EngineLayout

    dist.init_process_group("gloo")
    layout = EngineLayout(world=4, rtp=2, prompts=PROMPTS, n=N)
    records = [Record(f"p{g}", "q", "image", "numerical", (), "", "1", None, "s")
               for g in range(PROMPTS)]
    engine = layout.engine_of(rank)
    mine = _engine_batch(engine)
    out = []
    for dp_ranks, dp in plans:
        plan = plan_transfers(layout, dp_ranks, dp)
        index, share, received = redistribute(mine, layout.response_range(engine).start, plan,
                                              rank, records)
        out.append({"index": index, "groups": share.group_id.tolist(),
                    "group_of": share.group_of.tolist(),
                    "prompts": [p.tolist() for p in share.prompt_ids],
                    "responses": [r.tolist() for r in share.response_ids],
                    "logprobs": [lp.tolist() for lp in share.logprobs],
                    "advantage": share.columns["advantage"].tolist(),
                    "generated": share.group_columns["generated"].tolist(),
                    "problem_ids": [r.problem_id for r in share.records],
                    "received": received})
    return out


def _wire_bytes(rows: range) -> int:
    groups = sorted({i // N for i in rows})
    ints = 4 + 2 * len(groups) + 2 * len(rows) + sum(len(_prompt(g)) for g in groups) + sum(
        len(_response(i)) for i in rows)
    return 8 * ints + 4 * (len(rows) + sum(len(_response(i)) for i in rows))


def test_every_dp_rank_gets_exactly_its_share(dist_launch) -> None:
    plans = [([0, 0, 1, 1], 2),  # each share is one engine's output: local copies only
             ([3, 2, 1, 0], 4),  # every share comes from another rank
             ([0, 1, 0, 1], 2)]  # rank 1 takes engine 1's rows from rank 3, rank 2 engine 0's from 0
    results = dist_launch(_redistribute, 4, plans)
    for p, (dp_ranks, dp) in enumerate(plans):
        per = N * PROMPTS // dp
        for rank, res in enumerate(r[p] for r in results):
            rows = range(dp_ranks[rank] * per, (dp_ranks[rank] + 1) * per)
            groups = sorted({i // N for i in rows})
            assert res["index"] == list(rows), (p, rank)
            assert res["groups"] == groups and res["problem_ids"] == [f"p{g}" for g in groups]
            assert res["group_of"] == [groups.index(i // N) for i in rows]
            assert res["prompts"] == [_prompt(g) for g in groups]
            assert res["responses"] == [_response(i) for i in rows]
            assert res["logprobs"] == [[-float(i)] * len(_response(i)) for i in rows]
            assert res["advantage"] == [i / 4 for i in rows]
            assert res["generated"] == [float(g != 3) for g in groups]
            own = rows.start // (N * PROMPTS // 2) == rank // 2  # rows made by its own engine
            assert res["received"] == (0 if own else _wire_bytes(rows)), (p, rank)
