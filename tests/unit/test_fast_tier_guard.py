"""The fast tier's guard (tests/unit/conftest.py): what it refuses, and that it fails the
test rather than letting the code under test swallow the refusal."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.unit.conftest import install_guard, refused_reason


@pytest.mark.parametrize("cmd, what", [
    ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "x"],
     "torch.distributed.run"),
    (["/venv/bin/torchrun", "--nproc-per-node", "2", "-m", "sophiavl_mcore.train"], "torchrun"),
    ([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "m"],
     "vllm.entrypoints.openai.api_server"),
    (["vllm", "serve", "m"], "vllm serve"),
    (["/usr/bin/sbatch", "--parsable", "job.sh"], "sbatch"),
    (["srun", "hostname"], "srun"),
    (["/usr/sbin/slurmd", "-D"], "slurmd"),
    ("torchrun --nproc-per-node 2 -m sophiavl_mcore.train", "torchrun"),
    (["bash", "-c", "exec srun --ntasks 1 true"], "srun"),
])
def test_launchers_are_refused(cmd, what) -> None:
    assert refused_reason(cmd) == what


@pytest.mark.parametrize("cmd", [
    [sys.executable, "-m", "sophiavl_mcore.train", "--config", "r.yaml", "--dry-run"],
    ["bash", "scripts/main_job.sh", "train.total_steps=abc"],
    ["git", "rev-parse", "HEAD"],
    "echo torchrun_is_a_word_here",
])
def test_other_commands_run(cmd) -> None:
    assert refused_reason(cmd) is None


def test_a_guarded_popen_fails_the_test_through_except_exception(monkeypatch) -> None:
    install_guard(monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="starts 'srun'"):
        try:
            subprocess.run(["srun", "true"], check=False)
        except Exception:  # what code under test might do; the refusal is not an Exception
            pytest.fail("the refusal was an Exception")
    proc = subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, text=True)
    assert proc.stdout == "1\n"
