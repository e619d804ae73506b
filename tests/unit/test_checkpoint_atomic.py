"""CheckpointManager on one process (plain torch model + Adam + LR schedule).

Kill-safety: a child process is SIGKILLed in the middle of a save (paused by the
``on_file_written`` hook after its first file); the previous checkpoint stays the
newest complete one and ``load_latest`` restores it. Plus: exact resume, retention,
damaged files (error naming the file, or fallback), stale ``latest`` pointer, layout
mismatch, re-saving an older step, extra-state round trip, config validation.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sophiavl_mcore.checkpoint import CheckpointError
from sophiavl_mcore.checkpoint.config import CheckpointConfig
from sophiavl_mcore.checkpoint.manifest import (
    COMPLETE,
    MANIFEST,
    CheckpointCorruptError,
    sha256_file,
)
from sophiavl_mcore.checkpoint.training import LATEST, CheckpointManager
from sophiavl_mcore.data.records import MixedSampler
from sophiavl_mcore.testing.multiproc import kill_when_ready


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    return model, opt, sched


def _step(model, opt, sched) -> None:
    """One update whose batch depends on the numpy, python and torch generators."""
    x = torch.randn(4, 6) + float(np.random.rand()) + random.random()
    opt.zero_grad()
    model(x).pow(2).mean().backward()  # dropout draws from the torch generator too
    opt.step()
    sched.step()


def _reseed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_resume_is_bitwise_and_controls_differ(tmp_path):
    _reseed(1)
    model, opt, sched = _setup()
    for _ in range(4):
        _step(model, opt, sched)
    straight = _params(model)

    _reseed(1)
    model, opt, sched = _setup()
    for _ in range(2):
        _step(model, opt, sched)
    mgr = CheckpointManager(tmp_path / "ck", keep_last=3)
    mgr.save(2, model, opt, sched, extra_state={"policy_version": 2})

    results = {}
    for name, kwargs in (("full", {}), ("no_rng", {"restore_rng": False}),
                         ("no_optim", {"optimizer": None})):
        _reseed(123)  # the new "process" starts from other generator states and weights
        model, opt, sched = _setup(seed=9)
        loaded = mgr.load_latest(model, kwargs.get("optimizer", opt), sched,
                                 restore_rng=kwargs.get("restore_rng", True))
        assert loaded.step == 2 and loaded.extra_state == {"policy_version": 2}
        for _ in range(2):
            _step(model, opt, sched)
        results[name] = _params(model)
    assert _equal(results["full"], straight)
    assert not _equal(results["no_rng"], straight)
    assert not _equal(results["no_optim"], straight)


# ---------------------------------------------------------------- kill during save


def _child_save(root: str, ready: str) -> None:
    model, opt, sched = _setup(seed=0)
    mgr = CheckpointManager(root, keep_last=5)
    mgr.save(1, model, opt, sched, extra_state={"n": 1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    written: list[Path] = []

    def pause(path: Path) -> None:
        written.append(path)
        if len(written) == 2:  # two weight shards written, rank state + trainer state not yet
            Path(ready).write_text(str(path))
            time.sleep(600)  # the parent SIGKILLs us here, half-way through the save

    CheckpointManager(root, keep_last=5, on_file_written=pause).save(
        2, {"model": model, "head": torch.nn.Linear(3, 3)}, opt, sched, extra_state={"n": 2})


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    root, ready = tmp_path / "ck", tmp_path / "ready"
    written = kill_when_ready(_child_save, (str(root), str(ready)), ready)
    assert written.name == "head.safetensors" and ".tmp-" in written.parent.parent.name
    stale = [p.name for p in root.iterdir() if ".tmp-" in p.name]
    assert len(stale) == 1  # the interrupted save's directory is there, half written

    mgr = CheckpointManager(root)
    assert mgr.complete_steps() == [1]
    assert (root / LATEST).read_text().strip() == "step_00000001"
    model, opt, sched = _setup(seed=5)
    loaded = mgr.load_latest(model, opt, sched)
    assert loaded.step == 1 and loaded.extra_state == {"n": 1}
    assert _equal(_params(model), _params(_setup(seed=0)[0]))  # step 1's weights
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]  # cleaned


# ---------------------------------------------------------------- retention, damage


def _saved(root: Path, steps, **kw) -> CheckpointManager:
    mgr = CheckpointManager(root, **kw)
    model, opt, sched = _setup()
    for s in steps:
        _step(model, opt, sched)
        mgr.save(s, model, opt, sched, extra_state={"s": s})
    return mgr


def test_keep_last_and_latest_pointer(tmp_path):
    mgr = _saved(tmp_path, range(1, 6), keep_last=2)
    assert mgr.complete_steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step_00000004", "step_00000005"]
    assert (tmp_path / LATEST).read_text().strip() == "step_00000005"
    manifest = json.loads((tmp_path / "step_00000005" / MANIFEST).read_text())
    assert manifest["step"] == 5 and manifest["layout"] == {"tp": 1, "pp": 1, "dp": 1,
                                                            "world_size": 1}
    for rel, info in manifest["files"].items():
        path = tmp_path / "step_00000005" / rel
        assert path.stat().st_size == info["size"] and sha256_file(path) == info["sha256"]
    assert mgr.should_save(4) is False and CheckpointManager(tmp_path, save_interval=2).should_save(4)
    assert mgr.should_save(7, total_steps=7)


def test_corrupted_file_is_named_or_falls_back(tmp_path, caplog):
    mgr = _saved(tmp_path, [1, 2], keep_last=2)
    shard = tmp_path / "step_00000002" / "mp_rank_00_000" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size, one flipped byte in a weight
    shard.write_bytes(bytes(data))
    model, opt, sched = _setup()
    with pytest.raises(CheckpointCorruptError, match=r"mp_rank_00_000/model\.safetensors is corrupted"):
        mgr.load_latest(model, opt, sched)

    fallback = CheckpointManager(tmp_path, keep_last=2, on_corrupt="fallback")
    with caplog.at_level(logging.WARNING):
        loaded = fallback.load_latest(model, opt, sched)
    assert loaded.step == 1 and "skipping damaged checkpoint" in caplog.text

    (tmp_path / "step_00000001" / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000001/trainer_state\.json is missing"):
        fallback.load_latest(model, opt, sched)  # nothing left to fall back to


def test_manifest_tamper_and_layout_mismatch(tmp_path):
    mgr = _saved(tmp_path, [1])
    ck = tmp_path / "step_00000001"
    manifest = json.loads((ck / MANIFEST).read_text())
    manifest["layout"] = {"tp": 2, "pp": 2, "dp": 1, "world_size": 4}
    (ck / MANIFEST).write_text(json.dumps(manifest))
    model, opt, sched = _setup()
    with pytest.raises(CheckpointCorruptError, match="manifest.json is corrupted"):
        mgr.load_latest(model, opt, sched)
    # A consistent checkpoint from another layout: both layouts are named.
    marker = json.loads((ck / COMPLETE).read_text())
    marker["manifest_sha256"] = sha256_file(ck / MANIFEST)
    (ck / COMPLETE).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError) as err:
        mgr.load_latest(model, opt, sched)
    assert "tp=2 pp=2 dp=1 (world_size=4)" in str(err.value)
    assert "tp=1 pp=1 dp=1 (world_size=1)" in str(err.value)


def test_model_shape_mismatch_names_file_and_tensor(tmp_path):
    mgr = _saved(tmp_path, [1])
    other = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Dropout(0.3), torch.nn.Linear(4, 2))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit the model.*0\.weight"):
        mgr.load_latest(other)


def test_stale_latest_pointer_and_resave_older_step(tmp_path, caplog):
    mgr = _saved(tmp_path, [1, 2, 3], keep_last=5)
    (tmp_path / LATEST).write_text("step_00000001\n")  # killed before the pointer update
    model, opt, sched = _setup()
    with caplog.at_level(logging.WARNING):
        assert mgr.load_latest(model, opt, sched).step == 3
    assert "newest complete checkpoint is step_00000003" in caplog.text
    # Resumed from step 1 (e.g. on purpose): saving step 2 replaces the old 2, drops 3.
    mgr.load(tmp_path / "step_00000001", model, opt, sched)
    mgr.save(2, model, opt, sched, extra_state={"s": "again"})
    assert mgr.complete_steps() == [1, 2]
    assert mgr.load_latest(model).extra_state == {"s": "again"}
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


def test_extra_state_sampler_roundtrip_and_bad_value(tmp_path):
    sampler = MixedSampler([list(range(10)), list(range(100, 105))], seed=3)
    sampler.next_batch(7)
    model, opt, sched = _setup()
    mgr = CheckpointManager(tmp_path)
    mgr.save(7, model, opt, sched, extra_state={"sampler": sampler.state_dict(),
                                                "config": CheckpointConfig(dir="x")})
    resumed = MixedSampler([list(range(10)), list(range(100, 105))], seed=3)
    resumed.load_state_dict(mgr.load_latest(model).extra_state["sampler"])
    assert resumed.next_batch(9) == sampler.next_batch(9)
    with pytest.raises(CheckpointError, match="extra_state for step 8 cannot be saved as JSON"):
        mgr.save(8, model, extra_state={"bad": object()})
    assert mgr.complete_steps() == [7]
    assert CheckpointManager(tmp_path / "empty").load_latest(model) is None


def test_config_validation_names_values():
    with pytest.raises(ValueError) as err:
        CheckpointConfig(save_interval=-1, keep_last=0, on_corrupt="ignore")
    for text in ("save_interval=-1", "keep_last=0", "on_corrupt='ignore'"):
        assert text in str(err.value)
    with pytest.raises(ValueError, match="keep_last=0"):
        CheckpointManager("/tmp/x", keep_last=0)


def test_failed_save_leaves_nothing_behind(tmp_path):
    mgr = _saved(tmp_path, [1])
    model, opt, sched = _setup()

    class Broken:
        def state_dict(self):
            raise OSError("No space left on device")

    with pytest.raises(CheckpointError, match=r"step 2 .*rank 0: OSError\('No space left on device'\)"):
        mgr.save(2, model, Broken(), sched)
    assert mgr.complete_steps() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step_00000001"]


def test_resume_modes(tmp_path):
    _saved(tmp_path / "ck", [3])
    model = _setup()[0]
    assert CheckpointManager.from_config(CheckpointConfig(dir=str(tmp_path / "ck"))).resume(
        model).step == 3
    never = CheckpointManager.from_config(CheckpointConfig(dir=str(tmp_path / "ck"), resume="never"))
    assert never.resume(model) is None
    must = CheckpointManager.from_config(CheckpointConfig(dir=str(tmp_path / "none"), resume="must"))
    with pytest.raises(CheckpointError, match="resume=must but .*none holds no complete"):
        must.resume(model)
