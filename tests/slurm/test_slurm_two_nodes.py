"""The sbatch template on a real two-node Slurm (``slurm2``: two slurmd on this host,
``node0`` and ``node1``): one torchrun per node, meeting at the first node's address.

- TP=2 across the nodes (1 rank per node, world=2);
- 2 nodes × 2 ranks (world=4: trainer TP=2 × DP=2), the SPMD rollout layout;
- the same layout requeued mid-run: both nodes checkpoint, both restart, the run resumes
  from that checkpoint and ends at the same final step with no step lost or repeated.

Which global ranks a node holds is read from torchrun's rendezvous result in the node's
log (the rendezvous, not the node order, hands them out); torchrun gives a node
consecutive ranks, so TP pairs and RTP=2 engines (consecutive ranks) never span a node.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.slurm.conftest import TinyJob, submit_tiny

# The SPMD rollout builds one vLLM engine per block of RTP consecutive ranks: with two
# ranks per node and RTP=2, two engines, one per node (an engine never spans nodes).
SPMD_ROLLOUT: tuple[str, ...] = ("rollout.tensor_parallel_size=2",)
# 4 prompts × n=8 = 32 responses split over dp ≤ 2; a 2-step warm start (the format need
# not be learned here). A launch of 4 ranks is mostly imports and the engine build:
# 1-2.5 minutes on 2 cores, depending on what else runs there.
TWO_NODE = ("warm_start.steps=2", "train.prompts_per_step=4")
STOP = re.compile(r"checkpoint at step (\d+) saved, stopping for a restart")


def _assert_completed(job: TinyJob, total: int, restarts: int) -> None:
    info = job.cluster.wait(job.job_id, timeout_s=600)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.diagnostics()
    assert int(info["Restarts"]) == restarts, job.diagnostics()
    assert info["NumNodes"] == "2", info
    state = json.loads((job.output_dir / "run_state.json").read_text())
    assert state == {"status": "complete", "step": total}, job.diagnostics()
    assert [m["step"] for m in job.metrics()] == list(range(1, total + 1)), job.diagnostics()
    assert "training complete" in (job.log_dir / "batch.log").read_text(), job.diagnostics()


def _assert_layout(job: TinyJob, restart: int, per_node: int, tp: int, dp: int) -> None:
    """Each node logged its own launch and got ``per_node`` consecutive global ranks;
    together they are the whole world, and rank 0 reports the trainer layout."""
    world = job.nodes * per_node
    for node in range(job.nodes):
        log = job.node_log(restart, node)
        assert f"node {node} of {job.nodes}: node{node}, restart {restart}," in log, (
            f"node {node} did not launch in restart {restart}\n{job.diagnostics()}")
    ranks = job.node_ranks(restart)
    assert sorted(ranks) == list(range(job.nodes)), job.diagnostics()
    for node, rs in ranks.items():
        assert rs == list(range(rs[0], rs[0] + per_node)) and rs[0] % per_node == 0, (node, rs)
    assert sorted(r for rs in ranks.values() for r in rs) == list(range(world)), ranks
    assert f"parallel: world={world} tp={tp} pp=1 dp={dp} backend=gloo" in job.train_log(
        restart), job.diagnostics()


@pytest.mark.slow
def test_tp_spans_two_nodes(slurm2, tmp_path) -> None:
    """``--nodes=2`` with one rank per node: world=2, the TP=2 group spans the nodes."""
    total = 2
    job = submit_tiny(slurm2, tmp_path, "tp2x1", *TWO_NODE, f"train.total_steps={total}",
                      nodes=2, nproc=1)
    _assert_completed(job, total, restarts=0)
    _assert_layout(job, 0, per_node=1, tp=2, dp=1)
    assert re.search(rf"step {total} \|", job.train_log(0)), job.diagnostics()


@pytest.mark.slow
def test_two_nodes_two_ranks_requeue_resumes_on_both(slurm2, tmp_path) -> None:
    """2 nodes × 2 ranks (trainer TP=2 × DP=2; RTP=2 engines with SPMD_ROLLOUT), requeued
    after its first step: every rank on both nodes checkpoints at the same step k (the
    step run_state.json reports), both nodes restart, rank 0 resumes from step k's
    checkpoint, and the job completes with steps 1..total each logged once."""
    total = 4  # a requeue right after step 1 lands at step 2 or 3, never the last
    job = submit_tiny(slurm2, tmp_path, "spmd2x2", *TWO_NODE, *SPMD_ROLLOUT,
                      f"train.total_steps={total}", nodes=2, nproc=2)
    job.wait_for_step(1)
    slurm2.run_client("scontrol", "requeue", str(job.job_id))
    slurm2.wait_requeued(job.job_id)  # the old run has ended on both nodes; still held
    state = json.loads((job.output_dir / "run_state.json").read_text())
    assert state["status"] == "preempted", (state, job.diagnostics())
    k = state["step"]
    assert 1 <= k < total, (state, job.diagnostics())
    for node in range(2):  # every rank logs the stop (a warning); two ranks per node
        stops = STOP.findall(job.node_log(0, node))
        assert stops == [str(k)] * 2, (node, stops, job.diagnostics())
    _assert_layout(job, 0, per_node=2, tp=2, dp=2)
    slurm2.release(job.job_id)

    _assert_completed(job, total, restarts=1)
    _assert_layout(job, 1, per_node=2, tp=2, dp=2)
    assert re.search(rf"resumed from \S+step_0*{k}: continuing at step {k + 1}\b",
                     job.train_log(1)), job.diagnostics()
    assert not any(STOP.search(job.node_log(1, node)) for node in range(2)), job.diagnostics()
    for m in job.metrics():  # both engines, one per node, answered their share every step
        assert m["rollout/engines"] == 2, m
        assert m["rollout/engine_responses_min"] == m["rollout/engine_responses_max"] == 16, m
