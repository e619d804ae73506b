"""A signal mid-run makes the job checkpoint and stop; a restart resumes and finishes.

This is what Slurm does on preemption or ``scontrol requeue``: SIGTERM to every process
of the job step (torchrun and its workers), SIGKILL after ``KillWait``. Here the signal
is sent to the torchrun process group directly; tests/slurm does the same through a real
Slurm.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sophiavl_mcore.testing.multiproc import free_port
from tests.e2e.conftest import IN_PROCESS_TRM, RECIPE, ROOT

pytestmark = pytest.mark.slow

TOTAL = 6
# TP=2: the resumed checkpoint is sharded (the recipe itself trains data-parallel).
SHORT = ("parallel.tp=2", f"train.total_steps={TOTAL}", "warm_start.steps=10", "train.val_every=0",
         "train.log_samples_every=0", "checkpoint.save_interval=0", "export_hf=false",
         "train.prompts_per_step=8", *IN_PROCESS_TRM)


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(free_port()), "-m", "sophiavl_mcore.train", "--config",
            str(RECIPE), f"output_dir={out}", *SHORT]


def _steps(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sigterm_checkpoints_and_restart_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_cmd(out), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while len(_steps(out)) < 2:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the run did not reach step 2 in 10 minutes"
            time.sleep(0.5)
        # Like slurmstepd: every process of the step gets the signal.
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    first_log = (tmp_path / "first.log").read_text()
    state = json.loads((out / "run_state.json").read_text())
    assert state["status"] == "preempted", first_log[-4000:]
    stopped = state["step"]
    assert 2 <= stopped < TOTAL, f"stopped at {stopped}"
    # torchrun itself re-raises the SIGTERM it got (exit 1); the workers must have left
    # on their own after the checkpoint, not been killed by torchrun's SIGKILL.
    assert "stopping for a restart" in first_log, first_log[-4000:]
    assert "Sending process" not in first_log or "SIGKILL" not in first_log, first_log[-4000:]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert f"step_{stopped:08d}" in saved, saved

    second = subprocess.run(_cmd(out), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    second_log = second.stdout + second.stderr
    assert second.returncode == 0, second_log[-4000:]
    assert f"continuing at step {stopped + 1}" in second_log, second_log[-4000:]
    steps = [s["step"] for s in _steps(out)]
    assert steps == list(range(1, TOTAL + 1)), steps
    assert json.loads((out / "run_state.json").read_text()) == {"status": "complete", "step": TOTAL}
    last = _steps(out)[-1]
    assert last["reward/annealing"] == pytest.approx(math.exp(-(TOTAL - 1) / TOTAL), rel=1e-12)
