"""Configuration errors of both entry points (``train``, ``trm_train``) end the CLI in one
line naming the key and what was expected, with a non-zero exit status; a TRM recipe's old
``image:`` section is refused naming ``images:``; both jobs share one ``model`` section."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sophiavl_mcore.config import ConfigError, load_config
from sophiavl_mcore.trainer.config import ModelConfig
from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig
from sophiavl_mcore.trainer.sft.config import TRMTrainConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
TRM = ROOT / "examples" / "configs" / "trm_sft_tiny.yaml"
TRM_PATHS = ["model.hf_dir=hf", "data.path=d.jsonl", "output_dir=out"]


def _one_line(monkeypatch, capsys, main, argv: list[str]) -> str:
    """What the interpreter prints for ``main(argv)``'s error at top level."""
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    with pytest.raises(ConfigError) as info:
        main(argv)
    sys.excepthook(info.type, info.value, info.tb)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("override, expected", [
    ("bogus.key=1", "ConfigError: unknown key(s) bogus; valid keys at <root>: "),
    ("train.total_steps=abc", "ConfigError: train.total_steps: expected an integer, got 'abc'"),
    ("images.max_pixels=[1]", "ConfigError: images.max_pixels: expected an integer, got [1]"),
])
def test_train_config_errors_are_one_line(monkeypatch, capsys, override: str, expected: str) -> None:
    from sophiavl_mcore.train import main

    err = _one_line(monkeypatch, capsys, main, ["--config", str(TINY), "--dry-run", override])
    assert err.startswith(expected), err


@pytest.mark.parametrize("override, expected", [
    ("bogus.key=1", "ConfigError: unknown key(s) bogus; valid keys at <root>: "),
    ("sft.train_steps=abc", "ConfigError: sft.train_steps: expected an integer, got 'abc'"),
    ("model.dtype=float16", "ConfigError: model.dtype: 'float16' is not one of ['float32', 'bfloat16']"),
    ("image.max_pixels=1000", "ConfigError: image is now images: rename the key"),
])
def test_trm_train_config_errors_are_one_line(monkeypatch, capsys, override: str, expected: str) -> None:
    from sophiavl_mcore.trm_train import main

    err = _one_line(monkeypatch, capsys, main, ["--config", str(TRM), "--dry-run", *TRM_PATHS, override])
    assert err.startswith(expected), err


def test_trm_train_cli_exits_with_one_line() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "sophiavl_mcore.trm_train", "--config", str(TRM),
                           "--dry-run", *TRM_PATHS, "sft.train_steps=abc"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "ConfigError: sft.train_steps: expected an integer, got 'abc'"], proc.stderr


def test_trm_recipe_with_an_image_section_names_images(tmp_path: Path) -> None:
    recipe = tmp_path / "trm.yaml"
    recipe.write_text(f"base: {TRM}\nimage:\n  max_pixels: 200704\n")
    with pytest.raises(ConfigError, match=r"^image is now images: rename the key"):
        load_config(recipe, TRM_PATHS, cls=TRMTrainConfig)
    recipe.write_text(f"base: {TRM}\nimages:\n  max_pixels: 200704\n")
    assert load_config(recipe, TRM_PATHS, cls=TRMTrainConfig).images.max_pixels == 200704


def test_both_jobs_share_one_model_section() -> None:
    trm = load_config(TRM, [*TRM_PATHS, "model.freeze_vision=true"], cls=TRMTrainConfig)
    grpo = load_config(TINY, cls=GRPOTrainConfig)
    assert type(trm.model) is type(grpo.model) is ModelConfig
    assert trm.model.freeze_vision and trm.model.transformer_overrides() == {}
    with pytest.raises(ConfigError, match="model.tiny is the GRPO job's stand-in policy"):
        load_config(TRM, [*TRM_PATHS, "model.tiny=true"], cls=TRMTrainConfig)


def test_main_job_script_reports_a_bad_key_in_one_line() -> None:
    """``scripts/main_job.sh`` checks the config before torchrun (whose ChildFailedError
    would print a traceback under our line): one line on stderr, exit 1, nothing launched."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "main_job.sh"), "train.total_steps=abc"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("[setup_env]")]
    assert ours == ["ConfigError: train.total_steps: expected an integer, got 'abc'"], proc.stderr
    assert "torchrun" not in proc.stdout + proc.stderr


def test_removed_weight_sync_engine_rank_is_refused_with_the_reason(monkeypatch, capsys) -> None:
    """``weight_sync.engine_rank`` is gone (every rank holds an engine shard): a recipe or
    override that still sets it fails in one line naming the key and why."""
    from sophiavl_mcore.train import main

    err = _one_line(monkeypatch, capsys, main,
                    ["--config", str(TINY), "--dry-run", "weight_sync.engine_rank=0"])
    assert err.startswith("ConfigError: weight_sync.engine_rank is gone: every rank holds an "
                          "engine shard"), err
    assert "remove the key" in err
