"""The GRPO run's files and model dimensions from its config
(``trainer.grpo.config.GRPOTrainConfig``), before anything is built.

:func:`prepare_files` runs on every rank before any process group exists (rank 0
writes the synthetic task); the other ranks read its files after
:func:`~sophiavl_mcore.parallel.initialize_parallel` and a barrier
(:func:`~sophiavl_mcore.trainer.grpo.build.build_trainer`, which then builds every
rank's SPMD engine shard in the trainer's world). :func:`model_dims` /
:func:`model_config` give the policy's shapes from its ``config.json`` (or the shipped
public config, or the tiny stand-in's spec) without building it, for ``--dry-run`` and
the layout checks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sophiavl_mcore.data.config import DataSourceConfig
from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig

if TYPE_CHECKING:
    from sophiavl_mcore.models.tiny_spec import TinyModelSpec

logger = logging.getLogger(__name__)


def model_dir(cfg: GRPOTrainConfig) -> Path:
    return Path(cfg.output_dir) / "tiny_model" if cfg.model.tiny else Path(cfg.model.hf_dir)


def tiny_spec(cfg: GRPOTrainConfig) -> TinyModelSpec:
    from sophiavl_mcore.models.tiny_spec import TinyModelSpec

    # two KV heads so that TP=2 splits the query groups
    return TinyModelSpec(num_layers=cfg.model.tiny_layers, num_kv_heads=2, seed=cfg.seed)


_CONFIG_FALLBACKS_LOGGED: set[str] = set()


def model_config(cfg: GRPOTrainConfig) -> dict[str, Any]:
    """The policy's HF config.json (parsed): ``<model.hf_dir>/config.json``; when that file
    does not exist yet (a placeholder path, a checkpoint not downloaded — ``--dry-run``
    and ``tools/plan.py`` need only the config), the public config shipped in
    ``tools/configs/`` whose name is the directory's name lower-cased with every run of
    characters other than ``a-z0-9`` turned into ``_``
    (``/path/to/Qwen2.5-VL-72B-Instruct`` → ``qwen2_5_vl_72b_instruct.json``), logged once
    per directory. Neither → :class:`~sophiavl_mcore.planner.PlanError` naming every path
    tried. The tiny model reads its own (written by :func:`prepare_files`)."""
    import json

    from sophiavl_mcore.planner import model_config_path

    if cfg.model.tiny:
        return json.loads((model_dir(cfg) / "config.json").read_text())
    path = model_config_path(cfg.model.hf_dir)
    if path != Path(cfg.model.hf_dir) / "config.json" and cfg.model.hf_dir not in _CONFIG_FALLBACKS_LOGGED:
        _CONFIG_FALLBACKS_LOGGED.add(cfg.model.hf_dir)
        logger.warning("model.hf_dir=%s has no config.json: using the shipped %s for the model's "
                       "dimensions", cfg.model.hf_dir, path)
    return json.loads(path.read_text())


def model_dims(cfg: GRPOTrainConfig) -> tuple[int, int, int]:
    """(layers, heads, kv heads) without building anything (config from :func:`model_config`)."""
    if cfg.model.tiny:
        s = tiny_spec(cfg)
        return s.num_layers, s.num_heads, s.num_kv_heads
    from sophiavl_mcore.models.hf_config import read_lm_dims

    d = read_lm_dims(model_config(cfg))
    return d.num_layers, d.num_heads, d.num_kv_heads


def check_world(cfg: GRPOTrainConfig, world: int) -> int:
    """Validate the layout for ``world`` ranks and the batch split; returns dp."""
    from sophiavl_mcore.parallel import validate_layout

    dp = validate_layout(cfg.parallel, world, *model_dims(cfg))
    if cfg.responses_per_step % dp:
        raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} × rollout.sampling.n="
                         f"{cfg.rollout.sampling.n} = {cfg.responses_per_step} responses do not "
                         f"split over dp={dp}")
    if cfg.responses_per_step // dp % cfg.train.updates_per_rollout:
        raise ValueError(f"{cfg.responses_per_step // dp} responses per data-parallel rank "
                         f"(train.prompts_per_step={cfg.train.prompts_per_step} × n="
                         f"{cfg.rollout.sampling.n} / dp={dp}) do not split into "
                         f"train.updates_per_rollout={cfg.train.updates_per_rollout} mini-batches")
    if cfg.warm_start.steps and cfg.warm_start.global_batch_size % dp:
        raise ValueError(f"warm_start.global_batch_size={cfg.warm_start.global_batch_size} is not "
                         f"divisible by dp={dp}")
    return dp


def prepare_files(cfg: GRPOTrainConfig) -> GRPOTrainConfig:
    """Rank 0, before any group exists: write the synthetic task. Returns the config with
    ``rollout.model`` and ``data.sources`` filled in (every rank calls this; only rank 0
    writes). A ``model.tiny`` policy is written before this by the job's entry point
    (``testing.stand_ins``)."""
    from sophiavl_mcore.data.visual_task import write_dots_task

    out = Path(cfg.output_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    mdir = model_dir(cfg)
    rollout = dataclasses.replace(cfg.rollout, model=cfg.rollout.model or str(mdir))
    data = cfg.data
    if cfg.task.enabled:
        task_dir = out / "task"
        if rank0:
            write_dots_task(task_dir, cfg.task)
        data = dataclasses.replace(cfg.data, sources=[DataSourceConfig(
            path=str(task_dir / "train.jsonl"), name="dots")])
    ckpt = cfg.checkpoint
    if not ckpt.dir:
        ckpt = dataclasses.replace(ckpt, dir=str(out / "checkpoints"))
    return dataclasses.replace(cfg, rollout=rollout, data=data, checkpoint=ckpt)


def val_path(cfg: GRPOTrainConfig) -> Path | None:
    if cfg.task.enabled and cfg.task.num_val:
        return Path(cfg.output_dir) / "task" / "val.jsonl"
    return None


def torch_dtype(cfg: GRPOTrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
