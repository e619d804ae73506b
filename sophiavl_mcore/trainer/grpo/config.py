"""The GRPO job's config: its own sections (loss, reference policy, warm start, the run)
and :class:`GRPOTrainConfig`, everything ``python -m sophiavl_mcore.train`` reads, composed
with the shared sections (:mod:`sophiavl_mcore.trainer.config`) and every package's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from sophiavl_mcore.checkpoint.config import CheckpointConfig
from sophiavl_mcore.checks import check_real
from sophiavl_mcore.data.config import DataConfig, ImageConfig, PromptConfig, VisualTaskConfig
from sophiavl_mcore.parallel.config import ParallelConfig
from sophiavl_mcore.rewards.config import RewardsConfig
from sophiavl_mcore.rollout.config import RolloutConfig
from sophiavl_mcore.trainer.config import ModelConfig, OptimConfig, check_schedule
from sophiavl_mcore.weight_sync.config import WeightSyncConfig

# ------------------------------------------------------------------ loss

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def check_loss_settings(clip_eps_low: float, clip_eps_high: float, kl_coef: float,
                        entropy_coef: float, aggregation: str, kl_max: float) -> None:
    """The loss settings :class:`GRPOLossConfig` and ``trainer.grpo.loss.grpo_loss`` accept."""
    # ε_low < 1 keeps the lower clip bound 1 − ε_low a positive ratio.
    check_real("clip_eps_low", clip_eps_low, minimum=0.0, below=1.0)
    check_real("clip_eps_high", clip_eps_high, minimum=0.0)
    check_real("kl_coef", kl_coef, minimum=0.0)
    check_real("entropy_coef", entropy_coef, minimum=0.0)
    check_real("kl_max", kl_max)
    if kl_max <= 0:
        raise ValueError(f"kl_max must be > 0, got {kl_max!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {aggregation!r}")


@dataclasses.dataclass
class GRPOLossConfig:
    """GRPO loss settings (defaults: SophiaVL-R1 / the GRPO paper).

    Attributes:
        clip_eps_low: ε_low, lower clip bound 1 − ε_low on the ratio (0 ≤ ε_low < 1).
        clip_eps_high: ε_high, upper clip bound 1 + ε_high (DAPO's clip-higher: > ε_low).
        kl_coef: β, weight of the k3 KL penalty to the reference (paper 0.04; 0 = off).
        entropy_coef: weight of the entropy bonus (0 = off).
        aggregation: one of ``AGGREGATIONS`` (paper: token-mean).
        kl_max: upper clamp of the per-token k3 value (nats).
    """

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.04
    entropy_coef: float = 0.0
    aggregation: Aggregation = "token-mean"
    kl_max: float = 10.0

    def __post_init__(self) -> None:
        check_loss_settings(self.clip_eps_low, self.clip_eps_high, self.kl_coef, self.entropy_coef,
                            self.aggregation, self.kl_max)

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`grpo_loss` from this config."""
        return {
            "clip_eps_low": self.clip_eps_low, "clip_eps_high": self.clip_eps_high,
            "kl_coef": self.kl_coef, "entropy_coef": self.entropy_coef,
            "aggregation": self.aggregation, "kl_max": self.kl_max,
        }



# ------------------------------------------------------------------ reference policy


@dataclasses.dataclass
class ReferenceConfig:
    """Reference-policy settings.

    Attributes:
        enabled: keep a reference model (needed when the loss has ``kl_coef > 0``).
        offload: keep its weights in host memory between uses (GPU only; no-op on CPU).
    """

    enabled: bool = True
    offload: bool = True



# ------------------------------------------------------------------ GRPO job


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
    at most ``max_sampling_rounds`` extra rounds (:mod:`~sophiavl_mcore.trainer.grpo.sampling`).
    ``micro_batch_size``: responses per forward/backward of the update on one rank;
    ``logprob_micro_batch_size``: responses per forward of the no-grad passes (reference,
    old log-probs; verl's ``log_prob_micro_batch_size``), 0 = ``micro_batch_size``. No
    activations are kept for a backward there, so larger micro-batches cost little memory
    and fewer, wider forwards.
    """

    total_steps: int = 10
    prompts_per_step: int = 8
    updates_per_rollout: int = 1
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    micro_batch_size: int = 8
    logprob_micro_batch_size: int = 0
    val_every: int = 0
    val_size: int = 32
    log_samples_every: int = 0

    def __post_init__(self) -> None:
        errors = [f"{k}={getattr(self, k)} must be >= 1" for k in
                  ("total_steps", "prompts_per_step", "updates_per_rollout", "micro_batch_size",
                   "val_size")
                  if getattr(self, k) < 1]
        errors += [f"{k}={getattr(self, k)} must be >= 0" for k in
                   ("val_every", "log_samples_every", "max_sampling_rounds", "logprob_micro_batch_size")
                   if getattr(self, k) < 0]
        if errors:
            raise ValueError("train: " + "; ".join(errors))


@dataclasses.dataclass
class GRPOTrainConfig:
    """Everything ``python -m sophiavl_mcore.train`` reads (unknown keys are errors)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
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
