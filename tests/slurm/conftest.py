"""Real Slurm clusters (munged + slurmctld + slurmd from the Debian packages) per test
session — one node (``slurm``) and two nodes on this host (``slurm2``, one slurmd each) —
and helpers that submit the tiny CPU recipe through ``examples/slurm/tiny_cpu.sh``.

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
# torchrun's rendezvous result (LOGLEVEL=INFO, set by the template) in a node's log.
_GLOBAL_RANKS = re.compile(r"\bglobal_ranks=\[([\d, ]+)\]")
# The thinking reward is graded in-process: a TRM server on 127.0.0.1 is not reachable
# from a second node (multi-node jobs point rewards.thinking.base_url at their own).
# TP=2 (the recipe trains data-parallel): the launch tests shard the model over the ranks.
SHORT = ["parallel.tp=2", "warm_start.steps=4", "train.val_every=0", "train.log_samples_every=0", "train.prompts_per_step=8",
         "export_hf=false", "rewards.trm.serve=false", "rewards.thinking.backend=in_process"]


def _unavailable_reason() -> str | None:
    missing = missing_binaries()
    if missing:
        return f"Slurm/munge not installed (missing: {', '.join(missing)})"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


def _cluster(tmp_path_factory, nodes: int) -> Iterator[SlurmCluster]:
    """Start a cluster of ``nodes`` nodes; daemons are stopped (by pid) even when tests
    fail, and a job process that outlived the clean shutdown fails the teardown."""
    reason = _unavailable_reason()
    if reason:
        if os.environ.get("SOPHIAVL_REQUIRE_SLURM") == "1":
            pytest.fail(f"SOPHIAVL_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp(f"slurm{nodes}n"), nodes=nodes)
    cluster.start()
    try:
        yield cluster
    finally:
        strays = cluster.stop()
    assert not strays, f"processes outlived the {nodes}-node cluster's shutdown: {strays}"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Iterator[SlurmCluster]:
    """The session's one-node cluster (this host)."""
    yield from _cluster(tmp_path_factory, 1)


@pytest.fixture(scope="session")
def slurm2(tmp_path_factory) -> Iterator[SlurmCluster]:
    """The session's two-node cluster: ``node0`` and ``node1``, two slurmd on this host."""
    yield from _cluster(tmp_path_factory, 2)


@dataclass
class TinyJob:
    """One submission of the tiny CPU recipe: where its outputs and logs are."""

    cluster: SlurmCluster
    job_id: int
    output_dir: Path
    log_dir: Path
    nodes: int = 1

    def metrics(self) -> list[dict]:
        path = self.output_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def last_step(self) -> int:
        steps = [m["step"] for m in self.metrics()]
        return max(steps) if steps else 0

    def node_log(self, restart: int, node: int) -> str:
        """``train.r<restart>.node<node>.log``: that node's torchrun and ranks ("" if absent)."""
        path = self.log_dir / f"train.r{restart}.node{node}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def node_ranks(self, restart: int) -> dict[int, list[int]]:
        """Global ranks per node, from torchrun's rendezvous result in each node's log."""
        out = {}
        for node in range(self.nodes):
            match = _GLOBAL_RANKS.search(self.node_log(restart, node))
            if match:
                out[node] = [int(r) for r in match.group(1).split(",")]
        return out

    def train_log(self, restart: int) -> str:
        """The log of the node that holds global rank 0 (rank 0 logs at INFO, the others
        only warnings); node 0's when the rendezvous result is not (yet) in the logs."""
        ranks = self.node_ranks(restart)
        node = next((n for n, rs in ranks.items() if 0 in rs), 0)
        return self.node_log(restart, node)

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


def submit_tiny(cluster: SlurmCluster, work: Path, name: str, *overrides: str,
                nodes: int = 1, nproc: int = 2) -> TinyJob:
    """``examples/slurm/tiny_cpu.sh`` on ``nodes`` nodes × ``nproc`` ranks (default: 2 ranks
    on one node); outputs under ``work``."""
    out, logs = work / f"{name}-out", work / "logs"
    env = {**cluster.env, "PYTHON": sys.executable, "OUTPUT_DIR": str(out),
           "LOG_ROOT": str(logs), "CPUS_PER_TASK": str(min(2, cluster.cpus)),
           "NODES": str(nodes), "NPROC_PER_NODE": str(nproc), "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(["bash", str(TINY_WRAPPER), *SHORT, *overrides], env=env,
                         capture_output=True, text=True, cwd=work)
    assert res.returncode == 0, f"tiny_cpu.sh failed: {res.stdout}{res.stderr}"
    match = re.search(r"Submitted batch job (\d+)", res.stdout)
    assert match, f"no job id in sbatch output: {res.stdout!r}"
    job_id = int(match.group(1))
    return TinyJob(cluster, job_id, out, logs / str(job_id), nodes)
