"""parallel.collectives on two gloo processes: run_on_rank's result and failure reach
every rank (no hang), host gathers/reductions are ordered by global rank."""

from __future__ import annotations


def _fail_on(rank: int, who: int) -> str:
    if rank == who:
        raise ValueError(f"rank {rank} cannot do it")
    return "done"


def _collectives(rank: int) -> dict[str, object]:
    import functools

    import torch
    import torch.distributed as dist

    from sophiavl_mcore.parallel.collectives import (
        RemoteError,
        host_all_gather,
        host_all_gather_object,
        host_all_reduce,
        run_on_rank,
    )

    dist.init_process_group("gloo")
    out: dict[str, object] = {}
    out["ok"] = run_on_rank(lambda: {"from": dist.get_rank()}, src=1)
    out["ok_default_src"] = run_on_rank(lambda: dist.get_rank() * 10)
    try:
        run_on_rank(functools.partial(_fail_on, rank, 0))
        out["failure"] = None
    except RemoteError as err:
        out["failure"] = ("RemoteError", str(err))
    except ValueError as err:
        out["failure"] = ("ValueError", str(err))
    # the group is still usable after a failure: the next collective matches up
    out["after"] = run_on_rank(lambda: "still in step", src=1)
    out["gather"] = [t.tolist() for t in host_all_gather(torch.tensor([rank, rank + 1]))]
    out["max"] = host_all_reduce(torch.tensor([float(rank)]), op=dist.ReduceOp.MAX).item()
    out["objects"] = host_all_gather_object({"rank": rank})
    return out


def test_run_on_rank_result_and_failure_reach_every_rank(dist_launch):
    r0, r1 = dist_launch(_collectives, 2)
    for r in (r0, r1):
        assert r["ok"] == {"from": 1}
        assert r["ok_default_src"] == 0
        assert r["after"] == "still in step"
        assert r["gather"] == [[0, 1], [1, 2]]
        assert r["max"] == 1.0
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]
    assert r0["failure"] == ("ValueError", "rank 0 cannot do it")
    assert r1["failure"] == ("RemoteError", "rank 0 failed: ValueError: rank 0 cannot do it")


def test_run_on_rank_without_a_group_just_calls():
    from sophiavl_mcore.parallel.collectives import run_on_rank

    assert run_on_rank(lambda: 42, src=0) == 42
