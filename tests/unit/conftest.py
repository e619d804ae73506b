"""The fast tier's guard (``scripts/run_tests.sh --fast`` sets ``SOPHIAVL_FAST_TIER=1``).

The fast tier promises no torchrun, no servers and no Slurm (tests/unit without the
``slow`` and ``dist`` markers). Under that variable every ``subprocess.Popen`` (and so
``subprocess.run`` / ``check_output``) of this test process is checked, and a command that
would launch one of them fails the test loudly, naming the command and the marker the
test needs. ``pytest.fail`` raises an ``OutcomeException`` (a BaseException): an
``except Exception`` in the code under test does not swallow it. Without the variable
(the full run, or a plain ``pytest tests/unit``) nothing is patched.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator, Sequence

import pytest

FAST_TIER_ENV = "SOPHIAVL_FAST_TIER"
# executables (basename) and ``python -m`` modules (prefix) the fast tier must not start
REFUSED_EXECUTABLES = frozenset({"torchrun", "sbatch", "srun", "salloc", "slurmctld", "slurmd",
                                 "munged"})
REFUSED_MODULES = ("torch.distributed.run", "torch.distributed.launch", "vllm.entrypoints")


def _tokens(args: str | bytes | os.PathLike | Sequence) -> list[str]:
    """The words of a Popen command, words of shell strings (``bash -c "…"``) included."""
    items = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    out: list[str] = []
    for item in items:
        word = os.fsdecode(item) if isinstance(item, (bytes, os.PathLike)) else str(item)
        try:
            out.extend(shlex.split(word) if any(c.isspace() for c in word) else [word])
        except ValueError:  # unbalanced quotes: the raw words
            out.extend(word.split())
    return out


def refused_reason(args: str | bytes | os.PathLike | Sequence) -> str | None:
    """What in ``args`` the fast tier refuses (None: the command may run)."""
    words = _tokens(args)
    for i, word in enumerate(words):
        if os.path.basename(word) in REFUSED_EXECUTABLES:
            return os.path.basename(word)
        if word.startswith(REFUSED_MODULES):
            return word
        if os.path.basename(word) == "vllm" and words[i + 1:i + 2] == ["serve"]:
            return "vllm serve"
    return None


def install_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``subprocess.Popen`` refuse what :func:`refused_reason` names."""
    original = subprocess.Popen.__init__

    def guarded_init(self, args, *a, **kw):
        what = refused_reason(args)
        if what is not None:
            pytest.fail(f"fast tier ({FAST_TIER_ENV}=1): this test starts {what!r} "
                        f"(command: {args!r}); mark it slow or dist, or move it out of "
                        "tests/unit", pytrace=True)
        original(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded_init)


@pytest.fixture(scope="session", autouse=True)
def _fast_tier_guard() -> Iterator[None]:
    """Session-wide (it is set up before any other session fixture of tests/unit)."""
    if os.environ.get(FAST_TIER_ENV) != "1":
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        install_guard(mp)
        yield
