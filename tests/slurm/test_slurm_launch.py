"""The sbatch template on a real one-node Slurm: a run to completion, and a run that is
interrupted twice and resumes from its checkpoints.

"2 tasks" here is one Slurm task on the node (srun → torchrun) that starts 2 training
ranks (``--nproc-per-node 2``: TP=2 over gloo), the template's standard layout.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from tests.slurm.conftest import TinyJob, submit_tiny


def _tb_steps(tb_dir, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert tag in acc.Tags()["scalars"], f"{tag} not in {acc.Tags()['scalars']}"
    return sorted(e.step for e in acc.Scalars(tag))


def _assert_completed(job: TinyJob, total: int, restarts: int) -> None:
    info = job.cluster.wait(job.job_id, timeout_s=900)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.diagnostics()
    assert int(info["Restarts"]) == restarts, job.diagnostics()
    state = json.loads((job.output_dir / "run_state.json").read_text())
    assert state == {"status": "complete", "step": total}


def _assert_annealing(metrics: list[dict], total: int) -> None:
    """e^(-step/T) with step counted from 0: what an uninterrupted run logs."""
    for m in metrics:
        assert m["reward/annealing"] == pytest.approx(math.exp(-(m["step"] - 1) / total),
                                                      rel=1e-12), m["step"]
    assert metrics[-1]["reward/annealing"] == pytest.approx(math.exp(-(total - 1) / total),
                                                            rel=1e-12)


@pytest.mark.slow
def test_tiny_recipe_runs_to_completion(slurm, tmp_path) -> None:
    total = 4
    job = submit_tiny(slurm, tmp_path, "complete", f"train.total_steps={total}")
    _assert_completed(job, total, restarts=0)
    assert [m["step"] for m in job.metrics()] == list(range(1, total + 1))
    _assert_annealing(job.metrics(), total)
    assert _tb_steps(job.output_dir / "tb", "reward/outcome_mean") == list(range(1, total + 1))
    # Logs live in the per-job-id directory: the batch shell's and the node's training log.
    batch = (job.log_dir / "batch.log").read_text()
    assert "training complete" in batch, job.diagnostics()
    assert re.search(rf"step {total} \|", job.train_log(0)), job.diagnostics()


@pytest.mark.slow
def test_requeued_job_resumes_from_its_checkpoint(slurm, tmp_path) -> None:
    """Two interruptions of one job, each followed by a restart under the same job id:
    (1) ``scontrol requeue``: Slurm SIGTERMs the ranks, which checkpoint and exit;
    (2) SIGUSR1 to the batch shell (what ``--signal=B:USR1@…`` sends before the time
    limit): the shell forwards it, the ranks checkpoint, the shell requeues the job.
    The run must end at the same final step as an uninterrupted one, with no step lost
    or repeated and the same annealing schedule."""
    total = 12
    job = submit_tiny(slurm, tmp_path, "requeue", f"train.total_steps={total}",
                      "checkpoint.save_interval=2")

    first = job.wait_for_step(2)  # at least one periodic checkpoint exists
    slurm.requeue(job.job_id)  # waits for the old run to end, then releases the job
    r0 = job.train_log(0)
    stop1 = re.search(r"checkpoint at step (\d+) saved, stopping for a restart", r0)
    assert stop1, f"no preemption checkpoint after scontrol requeue\n{job.diagnostics()}"
    k1 = int(stop1.group(1))
    assert first <= k1 < total

    job.wait_for_step(k1 + 2)
    slurm.run_client("scancel", "--batch", "--signal=USR1", str(job.job_id))
    slurm.release(job.job_id)  # the shell requeued itself after the checkpoint
    batch = (job.log_dir / "batch.log").read_text()
    assert "requeueing job" in batch, job.diagnostics()
    stop2 = re.search(r"checkpoint at step (\d+) saved, stopping for a restart", job.train_log(1))
    assert stop2, job.diagnostics()
    k2 = int(stop2.group(1))
    assert k1 + 2 <= k2 < total

    _assert_completed(job, total, restarts=2)
    for restart, k in ((1, k1), (2, k2)):
        log = job.train_log(restart)
        assert re.search(rf"resumed from \S+step_0*{k}: continuing at step {k + 1}\b", log), (
            f"restart {restart} did not resume from step {k}\n{job.diagnostics()}")
    metrics = job.metrics()
    assert [m["step"] for m in metrics] == list(range(1, total + 1)), job.diagnostics()
    _assert_annealing(metrics, total)
    assert _tb_steps(job.output_dir / "tb", "reward/outcome_mean") == list(range(1, total + 1))


@pytest.mark.slow
def test_failed_run_fails_the_job(slurm, tmp_path) -> None:
    """A run that never reaches a step's end (here: a config error) is a FAILED job with
    the reason in the node's log, not a COMPLETED one and not a requeue."""
    job = submit_tiny(slurm, tmp_path, "broken", "train.bogus_key=1")
    info = slurm.wait(job.job_id, timeout_s=600)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", job.diagnostics()
    assert int(info["Restarts"]) == 0
    assert "train.bogus_key" in job.train_log(0), job.diagnostics()
    assert "did not reach the end of a step cleanly" in (job.log_dir / "batch.log").read_text()
