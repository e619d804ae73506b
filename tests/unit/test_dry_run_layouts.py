"""``python -m sophiavl_mcore.train --dry-run``: the rollout engine layout is printed, bad
layouts are refused with every number in the message, the shipped model config stands in
for a checkpoint not downloaded yet, and configuration errors end the CLI in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sophiavl_mcore.config import ConfigError
from sophiavl_mcore.rollout.layout import EngineLayoutError
from sophiavl_mcore.train import main

ROOT = Path(__file__).resolve().parents[2]
R7B = ROOT / "examples" / "configs" / "qwen2_5_vl_7b_8xh100.yaml"
R72B = ROOT / "examples" / "configs" / "qwen2_5_vl_72b_64xh100.yaml"


def _ckpt(tmp_path: Path, name: str) -> str:
    """A checkpoint directory holding only the public config.json."""
    shutil.copy(ROOT / "tools" / "configs" / name, tmp_path / "config.json")
    return str(tmp_path)


def _dry_run(monkeypatch, world: int, recipe: Path, *overrides: str) -> int:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    return main(["--config", str(recipe), *overrides, "--dry-run"])


def test_good_layout_prints_engines(monkeypatch, tmp_path, capfd) -> None:
    hf = _ckpt(tmp_path, "qwen2_5_vl_7b_instruct.json")
    assert _dry_run(monkeypatch, 8, R7B, f"model.hf_dir={hf}") == 0
    err = capfd.readouterr().err
    # 8 GPUs / rollout TP 2 = 4 engines, 64 prompts / 4 = 16 each
    assert "world=8 tp=4 pp=1 dp=2" in err
    assert "4 rollout engine(s) of TP=2 over 8 ranks, 16 prompts × n=8 each" in err
    assert "engine 3: ranks [6, 7] prompts 48-63" in err


@pytest.mark.parametrize("world,recipe,ckpt,overrides,needles", [
    # rollout TP does not divide the world (nor the 28 heads)
    (8, R7B, "qwen2_5_vl_7b_instruct.json", ["rollout.tensor_parallel_size=3"],
     ["world_size=8, rollout TP=3, prompts_per_step=64, n=8",
      "rollout.tensor_parallel_size=3 does not divide world_size=8",
      "num_attention_heads=28 is not divisible by rollout TP=3"]),
    # 6 prompts (48 responses: 24 per dp rank) do not split into 4 engines as whole groups
    (8, R7B, "qwen2_5_vl_7b_instruct.json", ["train.prompts_per_step=6"],
     ["train.prompts_per_step=6 does not split into 4 engines (world_size=8 / rollout TP=2)"]),
    # rollout TP larger than the 7B's 28 attention heads allow
    (8, R7B, "qwen2_5_vl_7b_instruct.json", ["rollout.tensor_parallel_size=8"],
     ["num_attention_heads=28 is not divisible by rollout TP=8"]),
    # rollout TP larger than the 72B's 16-head vision tower allows (64 LM heads would split)
    (64, R72B, "qwen2_5_vl_72b_instruct.json", ["rollout.tensor_parallel_size=32"],
     ["world_size=64, rollout TP=32, prompts_per_step=64, n=8",
      "vision num_heads=16 is not divisible by rollout TP=32"]),
])
def test_bad_layouts_are_refused_with_every_number(monkeypatch, tmp_path, world, recipe, ckpt,
                                                   overrides, needles) -> None:
    hf = _ckpt(tmp_path, ckpt)
    with pytest.raises(EngineLayoutError) as info:
        _dry_run(monkeypatch, world, recipe, f"model.hf_dir={hf}", *overrides)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_engine_spanning_nodes_is_refused(monkeypatch, tmp_path) -> None:
    hf = _ckpt(tmp_path, "qwen2_5_vl_72b_instruct.json")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("WORLD_SIZE", "64")
    with pytest.raises(EngineLayoutError, match="rollout TP=16 does not divide the 8 ranks per node"):
        main(["--config", str(R72B), f"model.hf_dir={hf}", "rollout.tensor_parallel_size=16", "--dry-run"])


def test_unknown_checkpoint_dir_names_every_path_tried(monkeypatch, tmp_path) -> None:
    from sophiavl_mcore.planner import PlanError

    hf = tmp_path / "My-Own-Model"
    with pytest.raises(PlanError) as info:
        _dry_run(monkeypatch, 8, R7B, f"model.hf_dir={hf}")
    assert str(hf / "config.json") in str(info.value)
    assert str(ROOT / "tools" / "configs" / "my_own_model.json") in str(info.value)


def test_72b_dry_run_before_the_checkpoint_is_downloaded(monkeypatch, capfd) -> None:
    from sophiavl_mcore.trainer import setup

    monkeypatch.setattr(setup, "_CONFIG_FALLBACKS_LOGGED", set())
    assert _dry_run(monkeypatch, 64, R72B) == 0  # model.hf_dir=/path/to/Qwen2.5-VL-72B-Instruct
    err = capfd.readouterr().err
    shipped = ROOT / "tools" / "configs" / "qwen2_5_vl_72b_instruct.json"
    assert f"has no config.json: using the shipped {shipped}" in err
    assert "world=64 tp=8 pp=4 dp=2" in err
    # 64 GPUs / rollout TP 8 = 8 engines (one per node), 64 prompts / 8 = 8 each
    assert "8 rollout engine(s) of TP=8 over 64 ranks, 8 prompts × n=8 each" in err
    assert "engine 7: ranks [56, 57, 58, 59, 60, 61, 62, 63] prompts 56-63" in err


def test_config_error_is_the_exception_in_process_and_one_line_on_the_cli(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    with pytest.raises(ConfigError, match="unknown key") as info:
        _dry_run(monkeypatch, 8, R7B, "train.bogus=1")
    sys.excepthook(info.type, info.value, info.tb)  # what the interpreter does at top level
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ConfigError: unknown key(s) train.bogus; valid keys at train: ")
    # an error raised elsewhere keeps its traceback
    try:
        raise ValueError("not a config error")
    except ValueError as plain:
        sys.excepthook(ValueError, plain, plain.__traceback__)
    assert "Traceback" in capsys.readouterr().err


def test_cli_prints_one_line_for_a_bad_key() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "8"}
    proc = subprocess.run([sys.executable, "-m", "sophiavl_mcore.train", "--config", str(R7B),
                           "train.bogus=1", "--dry-run"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ConfigError: unknown key(s) train.bogus; valid keys at train: "), proc.stderr
