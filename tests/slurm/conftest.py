"""A real one-node Slurm (munged + slurmctld + slurmd from the Debian packages) per test
session, and helpers that submit the tiny CPU recipe through ``examples/slurm/tiny_cpu.sh``.

Without the binaries (or not as root: slurmd must be root to start jobs) the tests are
skipped; ``SOPHIAVL_REQUIRE_SLURM=1`` (set in CI) turns that skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sophiavl_mcore.testing.slurm_cluster import SlurmCluster, missing_binaries

ROOT = Path(__file__).resolve().parents[2]
TINY_WRAPPER = ROOT / "examples" / "slurm" / "tiny_cpu.sh"
# Short runs: a few warm-start steps (the format need not be learned here), no
# validation, no HF export; what is under test is the launch, not the learning.
SHORT = ["warm_start.steps=4", "train.val_every=0", "train.log_samples_every=0", "train.prompts_per_step=8",
         "export_hf=false"]


def _unavailable_reason() -> str | None:
    missing = missing_binaries()
    if missing:
        return f"Slurm/munge not installed (missing: {', '.join(missing)})"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Iterator[SlurmCluster]:
    """The session's cluster; daemons are stopped (by pid) even when tests fail."""
    reason = _unavailable_reason()
    if reason:
        if os.environ.get("SOPHIAVL_REQUIRE_SLURM") == "1":
            pytest.fail(f"SOPHIAVL_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class TinyJob:
    """One submission of the tiny CPU recipe: where its outputs and logs are."""

    cluster: SlurmCluster
    job_id: int
    output_dir: Path
    log_dir: Path

    def metrics(self) -> list[dict]:
        path = self.output_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def last_step(self) -> int:
        steps = [m["step"] for m in self.metrics()]
        return max(steps) if steps else 0

    def train_log(self, restart: int) -> str:
        path = self.log_dir / f"train.r{restart}.node0.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def diagnostics(self) -> str:
        """Job record + the job's logs + the daemons' logs, for assertion messages."""
        parts = [f"job {self.job_id}: {self.cluster.job_info(self.job_id)}"]
        for path in sorted(self.log_dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-40:]
            parts.append(f"--- {path.name}\n" + "\n".join(tail))
        parts.append(self.cluster.daemon_logs(15))
        return "\n".join(parts)

    def wait_for_step(self, step: int, timeout_s: float = 600.0) -> int:
        """Block until metrics.jsonl shows ``step`` (returns the last step seen); fails
        if the job stops running first."""
        deadline = time.monotonic() + timeout_s
        while (last := self.last_step()) < step:
            state = self.cluster.job_state(self.job_id)
            if state not in ("PENDING", "RUNNING", "CONFIGURING"):
                pytest.fail(f"job ended ({state}) before step {step}\n{self.diagnostics()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no step {step} after {timeout_s:.0f}s\n{self.diagnostics()}")
            time.sleep(1.0)
        return last


def submit_tiny(cluster: SlurmCluster, work: Path, name: str, *overrides: str) -> TinyJob:
    """``examples/slurm/tiny_cpu.sh`` with 2 ranks on the one node; outputs under ``work``."""
    out, logs = work / f"{name}-out", work / "logs"
    env = {**cluster.env, "PYTHON": sys.executable, "OUTPUT_DIR": str(out),
           "LOG_ROOT": str(logs), "CPUS_PER_TASK": str(min(2, cluster.cpus)),
           "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(["bash", str(TINY_WRAPPER), *SHORT, *overrides], env=env,
                         capture_output=True, text=True, cwd=work)
    assert res.returncode == 0, f"tiny_cpu.sh failed: {res.stdout}{res.stderr}"
    match = re.search(r"Submitted batch job (\d+)", res.stdout)
    assert match, f"no job id in sbatch output: {res.stdout!r}"
    job_id = int(match.group(1))
    return TinyJob(cluster, job_id, out, logs / str(job_id))
