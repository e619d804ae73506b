"""How the ranks of one launch agree on the run's TRM server (no server started here)."""

from __future__ import annotations

import json
import time

import pytest

from sophiavl_mcore.rewards import trm_server
from sophiavl_mcore.rewards.config import LocalTRMConfig
from sophiavl_mcore.rewards.trm_server import _wait_for_info, launch_id
from sophiavl_mcore.rollout.server import server_env


@pytest.fixture
def launch(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    return launch_id()


def test_other_ranks_read_this_launchs_server_info(tmp_path, launch) -> None:
    path = tmp_path / "server.json"
    path.write_text(json.dumps({"launch": launch, "written_at": time.time(),
                                "base_url": "http://127.0.0.1:1234/v1"}))
    assert _wait_for_info(path, 5)["base_url"] == "http://127.0.0.1:1234/v1"


@pytest.mark.parametrize("stale", [
    {"launch": "127.0.0.1:1:old:", "written_at": "now"},     # another launch
    {"launch": "SAME", "written_at": 0.0},                   # this launch id, but long ago
])
def test_a_stale_server_info_is_not_used(tmp_path, launch, stale) -> None:
    info = {**stale, "base_url": "http://dead"}
    info["launch"] = launch if info["launch"] == "SAME" else info["launch"]
    info["written_at"] = time.time() if info["written_at"] == "now" else info["written_at"]
    (tmp_path / "server.json").write_text(json.dumps(info))
    with pytest.raises(TimeoutError, match="no TRM server info"):
        _wait_for_info(tmp_path / "server.json", 1.5)


def test_rank0_failure_reaches_the_other_ranks(tmp_path, launch) -> None:
    (tmp_path / "server.json").write_text(json.dumps(
        {"launch": launch, "written_at": time.time(), "error": "RuntimeError('no disk')"}))
    with pytest.raises(RuntimeError, match="no disk"):
        _wait_for_info(tmp_path / "server.json", 5)


def test_server_env_drops_the_launchers_variables(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    env = server_env(threads=3)
    assert "RANK" not in env and "MASTER_PORT" not in env and env["OMP_NUM_THREADS"] == "3"


@pytest.mark.parametrize("kwargs, match", [
    (dict(serve=True), "serve=true needs model_dir or tiny=true"),
    (dict(tiny=True, model_dir="/x"), "choose one"),
    (dict(tiny_records=2), "tiny_records=2 must be >= 8"),
])
def test_config_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LocalTRMConfig(**kwargs)


def test_tiny_trm_needs_the_observe_task(tmp_path) -> None:
    import dataclasses
    from pathlib import Path

    from sophiavl_mcore.config import load_config
    from sophiavl_mcore.testing.stand_ins import resolve_tiny_trm
    from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig

    recipe = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_cpu.yaml"
    cfg = load_config(recipe, [f"output_dir={tmp_path}"], cls=GRPOTrainConfig)
    assert cfg.rewards.trm.tiny
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, reasoning="free"))
    with pytest.raises(ValueError, match="task.reasoning=observe"):
        resolve_tiny_trm(cfg)


def test_an_unresolved_tiny_trm_is_refused_by_the_server(tmp_path) -> None:
    with pytest.raises(ValueError, match="rewards.trm.tiny is a test stand-in.*model_dir"):
        trm_server.start_local_trm(LocalTRMConfig(serve=True, tiny=True), tmp_path, rank=0)


def test_a_multi_node_job_cannot_serve_its_trm_on_localhost(monkeypatch) -> None:
    from pathlib import Path

    from sophiavl_mcore.config import load_config
    from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig

    recipe = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_cpu.yaml"
    cfg = load_config(recipe, cls=GRPOTrainConfig)
    assert cfg.rewards.trm.serve  # the main job serves its TRM
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=4, LOCAL_WORLD_SIZE=2.*base_url"):
        trm_server.serve_trm(cfg)
