"""One run of the README main job (the tiny CPU recipe) per test session.

The run is real end to end: ``torchrun --nproc-per-node 2 -m sophiavl_mcore.train`` with
TP=1 × DP=2 over gloo (the recipe's layout), a tiny random Qwen2.5-VL, a vLLM engine on each rank for rollouts, the
tiny dots TRM (trained once into the cache, served by the job over HTTP), a warm start,
GRPO steps and the HF export. Several tests read its
outputs (metrics.jsonl, TensorBoard events, export) instead of paying for more runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sophiavl_mcore.testing.multiproc import free_port

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
# Runs that test something else than the thinking reward (layouts, preemption, Slurm, …)
# grade with the in-process backend instead of booting the recipe's TRM server.
IN_PROCESS_TRM = ("rewards.trm.serve=false", "rewards.thinking.backend=in_process")


def launch(out_dir: Path, *overrides: str, timeout_s: float = 900,
           nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), "-m", "sophiavl_mcore.train", "--config", str(RECIPE),
           f"output_dir={out_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.fixture(scope="session")
def main_job(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("main_job")
    # ~10 min, plus ~5 min on a machine whose cache has no tiny TRM yet (it is trained first)
    proc = launch(out, timeout_s=2400)
    log = proc.stdout + proc.stderr
    (out / "launcher.log").write_text(log)
    if proc.returncode != 0:
        pytest.fail(f"main job exited with {proc.returncode}; last output:\n{log[-6000:]}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "steps": steps, "log": log}
