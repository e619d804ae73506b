"""A thinking reward model served on localhost for the length of a training job.

With ``rewards.trm.serve: true`` the job starts ``python -m
vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs) on a free port of the first
rank's node, on the TRM checkpoint ``rewards.trm.model_dir`` (``rewards.trm.tiny: true``
recipes get the tiny dots TRM's directory there from the job's entry point,
:mod:`sophiavl_mcore.testing.stand_ins`, before this runs). The run's thinking client then talks to it over HTTP (``rewards.thinking.backend: http``), as
the cluster recipes talk to theirs. The policy never grades itself.

Lifecycle: rank 0 starts the server before its own rollout engine,
so the server boots while the policy is being set up; it writes
``<output_dir>/trm/server.json`` (URL, model, pid, launch id), which the other ranks wait
for to learn the URL. :meth:`LocalTRM.wait_healthy` blocks until ``/health`` answers.
The server dies with its parent (``PR_SET_PDEATHSIG``), at interpreter exit,
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
import time
from pathlib import Path
from typing import Any

from sophiavl_mcore.atomic import atomic_write_text
from sophiavl_mcore.rewards.config import LocalTRMConfig

logger = logging.getLogger(__name__)


def launch_id() -> str:
    """Identifies one torchrun launch (the same on every rank of it)."""
    keys = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
    return ":".join(os.environ.get(k, "") for k in keys)


def make_server(model_dir: str | Path, log_path: str | Path, cfg: LocalTRMConfig) -> Any:
    """A :class:`~sophiavl_mcore.rollout.server.VllmServer` for ``model_dir`` whose
    process dies with this one and does not inherit the launcher's variables (not
    started yet)."""
    from sophiavl_mcore.rollout.server import VllmServer

    return VllmServer(model_dir, log_path, kv_cache_gb=cfg.kv_cache_gb,
                      max_num_seqs=cfg.max_num_seqs, owned=True)


class LocalTRM:
    """The run's TRM server as every rank sees it (rank 0 owns the process).

    ``info``: what ``server.json`` holds (``base_url``, ``model_dir``, ``pid``,
    ``served_name``); ``server``: the process handle on rank 0, else None.
    """

    def __init__(self, info: dict[str, Any], server: Any = None, timeout_s: float = 600.0) -> None:
        self.info, self.server = info, server
        self.timeout_s = timeout_s
        self._healthy = False

    @property
    def base_url(self) -> str:
        return str(self.info["base_url"])

    def thinking_config(self, thinking: Any) -> Any:
        """``thinking`` (a ThinkingRewardConfig) pointed at this server over HTTP."""
        return dataclasses.replace(thinking, backend="http", base_url=self.base_url,
                                   model=self.info.get("served_name", "trm"))

    def wait_healthy(self) -> None:
        """Rank 0: block until the server answers. Other ranks: no-op."""
        if self.server is None or self._healthy:
            return
        took = self.server.wait_healthy(timeout_s=self.timeout_s)
        self._healthy = True
        logger.info("TRM server healthy %.1f s after start", took)

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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if cfg.rewards.trm.serve and world > local:
        raise ValueError(f"rewards.trm.serve=true serves the TRM on 127.0.0.1 of the first node, "
                         f"which the other nodes cannot reach (WORLD_SIZE={world}, "
                         f"LOCAL_WORLD_SIZE={local}): serve it yourself and set "
                         f"rewards.trm.serve=false rewards.thinking.base_url=http://<host>:<port>/v1")
    trm = start_local_trm(cfg.rewards.trm, cfg.output_dir, rank)
    if trm is None:
        return cfg, None
    rewards = dataclasses.replace(cfg.rewards, thinking=trm.thinking_config(cfg.rewards.thinking))
    return dataclasses.replace(cfg, rewards=rewards), trm


def start_local_trm(cfg: LocalTRMConfig, output_dir: str | Path, rank: int) -> LocalTRM | None:
    """Before any process group exists: rank 0 starts the server on ``cfg.model_dir`` and
    writes ``<output_dir>/trm/server.json``; the other ranks wait for that file. Returns
    None when ``cfg.serve`` is off."""
    if not cfg.serve:
        return None
    if cfg.tiny:
        raise ValueError("rewards.trm.tiny is a test stand-in that the job's entry point resolves "
                         "into rewards.trm.model_dir (sophiavl_mcore.testing.stand_ins); "
                         "start_local_trm needs rewards.trm.model_dir")
    info_path = Path(output_dir) / "trm" / "server.json"
    if rank != 0:
        return LocalTRM(_wait_for_info(info_path, cfg.startup_timeout_s + 3600))
    info_path.parent.mkdir(parents=True, exist_ok=True)
    model_dir = Path(cfg.model_dir)
    try:
        server = make_server(model_dir, info_path.parent / "server.log", cfg).start()
    except BaseException as err:
        report_start_error(output_dir, err)
        raise
    atexit.register(server.stop)
    info = {"launch": launch_id(), "written_at": time.time(), "base_url": server.base_url,
            "served_name": server.served_name, "model_dir": str(model_dir.resolve()),
            "pid": server.proc.pid}
    atomic_write_text(info_path, json.dumps(info, indent=1))
    return LocalTRM(info, server, cfg.startup_timeout_s)


def report_start_error(output_dir: str | Path, err: BaseException) -> None:
    """Rank 0 could not start the run's TRM server: tell the ranks waiting for
    ``<output_dir>/trm/server.json`` (they raise with ``err``)."""
    info_path = Path(output_dir) / "trm" / "server.json"
    info_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(info_path, json.dumps({"launch": launch_id(), "error": repr(err),
                                             "written_at": time.time()}))


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
