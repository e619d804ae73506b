"""The GRPO run's typed configuration and its construction (everything before step 1).

Order matters on CPU: rank 0 builds the colocated vLLM engine *before* any trainer
process group exists and releases vLLM's one-rank default group
(:func:`~sophiavl_mcore.weight_sync.vllm_engine.release_engine_default_group`); only
then does :func:`~sophiavl_mcore.parallel.initialize_parallel` create the trainer's
world. Files rank 0 writes before that (tiny model, synthetic task) are read by the
other ranks after the world exists.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from sophiavl_mcore.checkpoint.config import CheckpointConfig
from sophiavl_mcore.data.images import ImageConfig
from sophiavl_mcore.data.prompts import PromptConfig
from sophiavl_mcore.data.records import DataConfig, DataSourceConfig
from sophiavl_mcore.data.visual_task import VisualTaskConfig
from sophiavl_mcore.parallel import ParallelConfig
from sophiavl_mcore.rewards.config import RewardsConfig
from sophiavl_mcore.rollout.config import RolloutConfig
from sophiavl_mcore.trainer.loss import GRPOLossConfig
from sophiavl_mcore.trainer.optim import OptimConfig
from sophiavl_mcore.trainer.reference_model import ReferenceConfig
from sophiavl_mcore.weight_sync.config import WeightSyncConfig

if TYPE_CHECKING:
    from sophiavl_mcore.testing.tiny_models import TinyModelSpec

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PolicyModelConfig:
    """The policy: an HF Qwen2.5-VL checkpoint, or (``tiny``) a tiny random one built
    into ``<output_dir>/tiny_model`` (hidden 128, head_dim 64; the CPU main job)."""

    hf_dir: str = ""
    tiny: bool = False
    tiny_layers: int = 2
    dtype: Literal["float32", "bfloat16"] = "float32"
    vocab_divisible_by: int = 1
    freeze_vision: bool = False
    # Transformer Engine FP8 linear layers (GPU + TE only; rejected on the local spec).
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] | None = None
    # Megatron activation recompute of the decoder ("selective": attention core only;
    # "full": whole layers, ``recompute_method`` over ``recompute_num_layers`` layers).
    recompute_granularity: Literal["selective", "full"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None

    def __post_init__(self) -> None:
        errors = []
        if self.fp8_recipe is not None and self.fp8 is None:
            errors.append(f"model.fp8_recipe={self.fp8_recipe!r} needs model.fp8 (e4m3 or hybrid)")
        full = self.recompute_granularity == "full"
        if full and (self.recompute_method is None or not self.recompute_num_layers):
            errors.append("model.recompute_granularity='full' needs model.recompute_method "
                          f"(got {self.recompute_method!r}) and model.recompute_num_layers >= 1 "
                          f"(got {self.recompute_num_layers!r})")
        if not full and (self.recompute_method is not None or self.recompute_num_layers):
            errors.append(f"model.recompute_method={self.recompute_method!r} / "
                          f"recompute_num_layers={self.recompute_num_layers!r} apply only to "
                          f"recompute_granularity='full' (got {self.recompute_granularity!r})")
        if errors:
            raise ValueError("; ".join(errors))

    def transformer_overrides(self) -> dict[str, Any]:
        """FP8 + recompute keyword arguments for ``build_qwen2_lm`` (unset ones left out)."""
        keys = ("fp8", "fp8_recipe", "recompute_granularity", "recompute_method",
                "recompute_num_layers")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclasses.dataclass
class WarmStartConfig:
    """Supervised warm start on formatted examples before GRPO (0 steps = none).

    ``uniform_answers``: targets carry random answers (the visual task's), so the warm
    start teaches ``<think>…</think><answer>…</answer>`` and not the task itself.
    """

    steps: int = 0
    global_batch_size: int = 16
    micro_batch_size: int = 8
    lr: float = 2e-3
    uniform_answers: bool = True
    reasoning: str = "I count the dots."


@dataclasses.dataclass
class GRPORunConfig:
    """Step geometry (counts) and cadence (every K steps; 0 = never).

    ``updates_per_rollout``: optimizer updates per step (verl's PPO mini-batches): each
    data-parallel share is cut into that many mini-batches, old log-probs are computed
    once before the first; 1 = one update, whose ratio is exactly 1 (old log-probs are
    the training forward's own, detached: no extra forward pass).
    ``dynamic_sampling``: drop groups whose rewards are all equal and draw more prompts,
    at most ``max_sampling_rounds`` extra rounds (:mod:`~sophiavl_mcore.trainer.sampling`).
    """

    total_steps: int = 10
    prompts_per_step: int = 8
    updates_per_rollout: int = 1
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    micro_batch_size: int = 8
    val_every: int = 0
    val_size: int = 32
    log_samples_every: int = 0

    def __post_init__(self) -> None:
        errors = [f"{k}={getattr(self, k)} must be >= 1" for k in
                  ("total_steps", "prompts_per_step", "updates_per_rollout", "micro_batch_size",
                   "val_size")
                  if getattr(self, k) < 1]
        errors += [f"{k}={getattr(self, k)} must be >= 0" for k in
                   ("val_every", "log_samples_every", "max_sampling_rounds") if getattr(self, k) < 0]
        if errors:
            raise ValueError("train: " + "; ".join(errors))


@dataclasses.dataclass
class GRPOTrainConfig:
    """Everything ``python -m sophiavl_mcore.train`` reads (unknown keys are errors)."""

    model: PolicyModelConfig = dataclasses.field(default_factory=PolicyModelConfig)
    task: VisualTaskConfig = dataclasses.field(default_factory=VisualTaskConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    images: ImageConfig = dataclasses.field(default_factory=ImageConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    rewards: RewardsConfig = dataclasses.field(default_factory=RewardsConfig)
    loss: GRPOLossConfig = dataclasses.field(default_factory=GRPOLossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    weight_sync: WeightSyncConfig = dataclasses.field(default_factory=WeightSyncConfig)
    warm_start: WarmStartConfig = dataclasses.field(default_factory=WarmStartConfig)
    train: GRPORunConfig = dataclasses.field(default_factory=GRPORunConfig)
    # checkpoint.dir empty: <output_dir>/checkpoints; checkpoint.save_interval=0: only
    # after the last step. ``--resume`` sets checkpoint.resume=must.
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    output_dir: str = "runs/grpo"
    export_hf: bool = True
    seed: int = 1234

    def __post_init__(self) -> None:
        from sophiavl_mcore.trainer.optim import check_schedule

        errors = []
        if not self.model.tiny and not self.model.hf_dir:
            errors.append("model.hf_dir must be set (or model.tiny=true)")
        if not self.task.enabled and not self.data.sources:
            errors.append("data.sources is empty and task.enabled is false: nothing to train on")
        if self.loss.kl_coef > 0 and not self.reference.enabled:
            errors.append(f"loss.kl_coef={self.loss.kl_coef} > 0 needs reference.enabled=true")
        if self.rollout.sampling.n < 2:
            errors.append(f"rollout.sampling.n={self.rollout.sampling.n}: GRPO needs >= 2 "
                          "responses per prompt for a group advantage")
        if not self.output_dir:
            errors.append("output_dir must be set")
        if errors:
            raise ValueError("; ".join(errors))
        check_schedule(self.optim, self.optimizer_updates)

    @property
    def optimizer_updates(self) -> int:
        """Optimizer updates over the run (the LR schedule's horizon)."""
        return self.train.total_steps * self.train.updates_per_rollout

    @property
    def responses_per_step(self) -> int:
        return self.train.prompts_per_step * self.rollout.sampling.n


def model_dir(cfg: GRPOTrainConfig) -> Path:
    return Path(cfg.output_dir) / "tiny_model" if cfg.model.tiny else Path(cfg.model.hf_dir)


def tiny_spec(cfg: GRPOTrainConfig) -> TinyModelSpec:
    from sophiavl_mcore.testing.tiny_models import TinyModelSpec

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
    """Rank 0, before any group exists: write the tiny model and the task. Returns the
    config with ``rollout.model`` and ``data.sources`` filled in (every rank calls this;
    only rank 0 writes)."""
    from sophiavl_mcore.data.visual_task import write_dots_task

    out = Path(cfg.output_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    mdir = model_dir(cfg)
    if rank0 and cfg.model.tiny and not (mdir / "config.json").is_file():
        from sophiavl_mcore.testing.tiny_models import build_tiny_qwen2_5_vl

        build_tiny_qwen2_5_vl(mdir, tiny_spec(cfg))
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
