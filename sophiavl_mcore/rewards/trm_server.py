"""A thinking reward model served on localhost for the length of a training job.

With ``rewards.trm.serve: true`` the job starts ``python -m
vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs) on a free port of the first
rank's node, on the TRM checkpoint ``rewards.trm.model_dir`` — or, with
``rewards.trm.tiny: true``, on the tiny dots TRM that
:mod:`sophiavl_mcore.testing.tiny_trm` trains with ``trm_train`` once and caches. The
run's thinking client then talks to it over HTTP (``rewards.thinking.backend: http``), as
the cluster recipes talk to theirs. The policy never grades itself.

Lifecycle: rank 0 builds (if needed) and starts the server before its own rollout engine,
so the server boots while the policy is being set up; it writes
``<output_dir>/trm/server.json`` (URL, model, pid, launch id), which the other ranks wait
for to learn the URL. :meth:`LocalTRM.wait_healthy` blocks until ``/health`` answers (the
first call on rank 0 also scores the tiny TRM's held-out set if its agreement is not
cached yet). The server dies with its parent (``PR_SET_PDEATHSIG``), at interpreter exit,
or in :meth:`LocalTRM.stop`.

The URL is 127.0.0.1: ranks on other nodes cannot reach it; multi-node runs serve the TRM
themselves and set ``rewards.thinking.base_url`` (README, cluster guide).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# torchrun's variables: a server started from a rank must not think it is one.
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                 "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                 "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE",
                 "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS")


@dataclasses.dataclass
class LocalTRMConfig:
    """A TRM the job serves itself (``rewards.trm``).

    Attributes:
        serve: start a vLLM OpenAI-compatible server for the run and point
            ``rewards.thinking`` at it (backend ``http``); False = use
            ``rewards.thinking`` as configured (an external server, or in-process).
        model_dir: HF checkpoint of the TRM (e.g. the released SophiaVL-R1 TRM).
        tiny: serve the tiny dots TRM instead (built and trained once, then cached;
            :mod:`sophiavl_mcore.testing.tiny_trm`). Needs ``task.reasoning: observe``.
        tiny_recipe: the ``trm_train`` recipe the tiny TRM is trained with (relative
            paths: to the repository root).
        tiny_records: images in the tiny TRM's training set (4 reasonings each).
        tiny_heldout: held-out images (4 reasonings each) for its agreement figures.
        cache_dir: where the tiny TRM is cached ("" = ``$SOPHIAVL_CACHE`` or
            ``~/.cache/sophiavl_mcore``).
        startup_timeout_s: how long the server may take to answer ``/health``.
        kv_cache_gb: the server's CPU KV cache (GiB).
        max_num_seqs: requests the server batches at once.
    """

    serve: bool = False
    model_dir: str = ""
    tiny: bool = False
    tiny_recipe: str = "examples/configs/trm_dots_tiny.yaml"
    tiny_records: int = 768
    tiny_heldout: int = 96
    cache_dir: str = ""
    startup_timeout_s: float = 600.0
    kv_cache_gb: int = 1
    max_num_seqs: int = 128

    def __post_init__(self) -> None:
        errors = []
        if self.serve and not (self.tiny or self.model_dir):
            errors.append("serve=true needs model_dir or tiny=true")
        if self.tiny and self.model_dir:
            errors.append(f"tiny=true and model_dir={self.model_dir!r}: choose one")
        if self.tiny_records < 8 or self.tiny_heldout < 1:
            errors.append(f"tiny_records={self.tiny_records} must be >= 8 and "
                          f"tiny_heldout={self.tiny_heldout} >= 1")
        if self.startup_timeout_s <= 0 or self.kv_cache_gb < 1 or self.max_num_seqs < 1:
            errors.append(f"startup_timeout_s={self.startup_timeout_s} must be > 0, kv_cache_gb="
                          f"{self.kv_cache_gb} and max_num_seqs={self.max_num_seqs} >= 1")
        if errors:
            raise ValueError("rewards.trm: " + "; ".join(errors))


def launch_id() -> str:
    """Identifies one torchrun launch (the same on every rank of it)."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
    return ":".join(os.environ.get(k, "") for k in keys)


def server_env(base: dict[str, str] | None = None, threads: int | None = None) -> dict[str, str]:
    """The environment for a server or job started from inside a rank: the launcher's
    variables removed, ``OMP_NUM_THREADS`` = all cores unless given."""
    env = {k: v for k, v in (base or os.environ).items() if k not in _LAUNCHER_ENV}
    env["OMP_NUM_THREADS"] = str(threads or os.cpu_count() or 1)
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def make_server(model_dir: str | Path, log_path: str | Path, cfg: LocalTRMConfig) -> Any:
    """A :class:`~sophiavl_mcore.testing.vllm_server.VllmServer` whose process dies with
    this one and does not inherit the launcher's variables (not started yet)."""
    import subprocess

    from sophiavl_mcore.testing.vllm_server import VllmServer

    class _OwnedServer(VllmServer):
        def start(self) -> _OwnedServer:
            if self.proc is not None and self.proc.poll() is None:
                return self
            env = server_env()
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gb))
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._t_start = time.monotonic()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                             env=env, start_new_session=True,
                                             preexec_fn=_die_with_parent)
            logger.info("TRM server pid=%d on %s (model %s, log %s)", self.proc.pid,
                        self.base_url, self.model_dir, self.log_path)
            return self

    return _OwnedServer(model_dir, log_path, kv_cache_gb=cfg.kv_cache_gb,
                        max_num_seqs=cfg.max_num_seqs)


class LocalTRM:
    """The run's TRM server as every rank sees it (rank 0 owns the process).

    ``info``: what ``server.json`` holds (``base_url``, ``model_dir``, ``pid``,
    ``tiny_dir``); ``server``: the process handle on rank 0, else None.
    """

    def __init__(self, info: dict[str, Any], server: Any = None, tiny_dir: Path | None = None,
                 timeout_s: float = 600.0, thinking: Any = None) -> None:
        self.info, self.server, self.tiny_dir = info, server, tiny_dir
        self.timeout_s = timeout_s
        self.thinking = thinking  # rank 0: the run's client settings (for the held-out set)
        self._healthy = False

    @property
    def base_url(self) -> str:
        return str(self.info["base_url"])

    def thinking_config(self, thinking: Any) -> Any:
        """``thinking`` (a ThinkingRewardConfig) pointed at this server over HTTP."""
        return dataclasses.replace(thinking, backend="http", base_url=self.base_url,
                                   model=self.info.get("served_name", "trm"))

    def wait_healthy(self) -> None:
        """Rank 0: block until the server answers; the first time, score the tiny TRM's
        held-out set when its agreement is not cached. Other ranks: no-op."""
        if self.server is None or self._healthy:
            return
        took = self.server.wait_healthy(timeout_s=self.timeout_s)
        self._healthy = True
        logger.info("TRM server healthy %.1f s after start", took)
        if self.tiny_dir is not None:
            from sophiavl_mcore.testing.tiny_trm import ensure_agreement

            ensure_agreement(self.tiny_dir, self.thinking_config(self.thinking))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            logger.info("TRM server stopped")
            self.server = None


def serve_trm(cfg: Any) -> tuple[Any, LocalTRM | None]:
    """For a training config (``rewards``, ``task``, ``output_dir``): start the run's TRM
    server when ``rewards.trm.serve`` and the thinking reward is on (see
    :func:`start_local_trm`); return the config with ``rewards.thinking`` pointed at it,
    and the handle (None when not serving)."""
    if not cfg.rewards.trust_grpo.use_thinking:  # plain GRPO: nobody asks the TRM
        return cfg, None
    rank = int(os.environ.get("RANK", "0"))
    trm = start_local_trm(cfg.rewards.trm, cfg.task, cfg.output_dir, rank, cfg.rewards.thinking)
    if trm is None:
        return cfg, None
    rewards = dataclasses.replace(cfg.rewards, thinking=trm.thinking_config(cfg.rewards.thinking))
    return dataclasses.replace(cfg, rewards=rewards), trm


def start_local_trm(cfg: LocalTRMConfig, task: Any, output_dir: str | Path, rank: int,
                    thinking: Any = None) -> LocalTRM | None:
    """Before any process group exists: rank 0 builds (tiny) and starts the server and
    writes ``<output_dir>/trm/server.json``; the other ranks wait for that file. Returns
    None when ``cfg.serve`` is off. ``thinking``: the run's ThinkingRewardConfig (the
    tiny TRM is trained on its prompt settings; None = the client's defaults)."""
    if not cfg.serve:
        return None
    if cfg.tiny and getattr(task, "reasoning", None) != "observe":
        raise ValueError("rewards.trm.tiny grades the dots task's 'observe' reasoning: set "
                         "task.enabled=true and task.reasoning=observe")
    info_path = Path(output_dir) / "trm" / "server.json"
    if rank != 0:
        return LocalTRM(_wait_for_info(info_path, cfg.startup_timeout_s + 3600))
    info_path.parent.mkdir(parents=True, exist_ok=True)
    if thinking is None:
        from sophiavl_mcore.rewards.thinking import ThinkingRewardConfig

        thinking = ThinkingRewardConfig()
    tiny_dir = None
    try:
        model_dir = Path(cfg.model_dir)
        if cfg.tiny:
            from sophiavl_mcore.testing.tiny_trm import ensure_tiny_trm

            tiny_dir = ensure_tiny_trm(cfg, task, thinking)
            model_dir = tiny_dir / "hf"
        server = make_server(model_dir, info_path.parent / "server.log", cfg).start()
    except BaseException as err:
        info_path.write_text(json.dumps({"launch": launch_id(), "error": repr(err),
                                         "written_at": time.time()}))
        raise
    atexit.register(server.stop)
    info = {"launch": launch_id(), "written_at": time.time(), "base_url": server.base_url,
            "served_name": server.served_name, "model_dir": str(model_dir.resolve()),
            "pid": server.proc.pid, "tiny_dir": str(tiny_dir) if tiny_dir else None}
    tmp = info_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(info_path)
    return LocalTRM(info, server, tiny_dir, cfg.startup_timeout_s, thinking)


def _wait_for_info(path: Path, timeout_s: float) -> dict[str, Any]:
    """The ``server.json`` rank 0 writes for this launch (an older one is ignored)."""
    import psutil

    started = psutil.Process().create_time()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = None
        if info and info.get("launch") == launch_id() and info["written_at"] >= started - 60:
            if "error" in info:
                raise RuntimeError(f"rank 0 could not start the TRM server: {info['error']}")
            return info
        time.sleep(1.0)
    raise TimeoutError(f"no TRM server info at {path} after {timeout_s:.0f} s")
