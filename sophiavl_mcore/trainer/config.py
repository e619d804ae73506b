"""The trainer's typed config sections and the two job configs that compose every package's.

``GRPOTrainConfig`` is what ``python -m sophiavl_mcore.train`` reads, ``TRMTrainConfig``
what ``python -m sophiavl_mcore.trm_train`` reads; both take the policy/TRM model from one
``model`` section (:class:`ModelConfig`). Sections owned by other packages come from
their ``config`` modules (``data.config``, ``parallel.config``, ``rollout.config``,
``rewards.config``, ``weight_sync.config``). Unknown keys and ill-typed values are errors
(:mod:`sophiavl_mcore.config`); each ``__post_init__`` checks what the types cannot.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from sophiavl_mcore.checkpoint.config import CheckpointConfig
from sophiavl_mcore.checks import check_real
from sophiavl_mcore.data.config import DataConfig, ImageConfig, PromptConfig, VisualTaskConfig
from sophiavl_mcore.parallel.config import ParallelConfig
from sophiavl_mcore.rewards.config import RewardsConfig, ThinkingRewardConfig
from sophiavl_mcore.rollout.config import RolloutConfig
from sophiavl_mcore.weight_sync.config import WeightSyncConfig

# ------------------------------------------------------------------ loss

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def check_loss_settings(clip_eps_low: float, clip_eps_high: float, kl_coef: float,
                        entropy_coef: float, aggregation: str, kl_max: float) -> None:
    """The loss settings :class:`GRPOLossConfig` and ``trainer.loss.grpo_loss`` accept."""
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


# ------------------------------------------------------------------ optimizer


@dataclasses.dataclass
class OptimConfig:
    """Megatron's Adam (or SGD) + LR schedule. ``lr`` is the peak; steps count updates.

    Attributes:
        optimizer: ``adam`` (AdamW) or ``sgd`` (with ``sgd_momentum``). SGD moves each
            weight in proportion to its gradient, where Adam moves every weight with a
            non-zero gradient by about ``lr``: for tiny models at large learning rates
            that difference decides whether updates stay on the few weights that carry
            the reward signal.
        lr: peak learning rate (after warmup).
        min_lr: floor of the decay (cosine / linear end at ``min_lr``).
        weight_decay: decoupled (AdamW) weight decay; Megatron skips biases and norms.
        adam_beta1, adam_beta2, adam_eps: Adam moments.
        clip_grad: global L2 gradient-norm clip; 0 disables clipping.
        warmup_steps: linear warmup from 0 to ``lr`` over this many updates.
        decay_style: ``cosine`` / ``linear`` to ``min_lr`` after warmup, or ``constant``.
        decay_steps: updates over which the LR decays (warmup included, Megatron's
            convention); 0 = the run's total steps.
        use_distributed_optimizer: shard optimizer state over data-parallel ranks.
    """

    optimizer: Literal["adam", "sgd"] = "adam"
    sgd_momentum: float = 0.9
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int = 0
    use_distributed_optimizer: bool = False

    def __post_init__(self) -> None:
        errors = []
        if not self.lr > 0:
            errors.append(f"lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            errors.append(f"need 0 <= min_lr={self.min_lr} <= lr={self.lr}")
        if self.weight_decay < 0:
            errors.append(f"weight_decay={self.weight_decay} must be >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0 <= self.sgd_momentum < 1:
            errors.append(f"sgd_momentum={self.sgd_momentum} must be in [0, 1)")
        if not self.adam_eps > 0:
            errors.append(f"adam_eps={self.adam_eps} must be > 0")
        if self.clip_grad < 0:
            errors.append(f"clip_grad={self.clip_grad} must be >= 0 (0 disables)")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            errors.append(f"warmup_steps={self.warmup_steps} and decay_steps={self.decay_steps} "
                          "must be >= 0")
        if self.decay_steps and self.warmup_steps >= self.decay_steps:
            errors.append(f"warmup_steps={self.warmup_steps} must be < decay_steps={self.decay_steps}")
        if errors:
            raise ValueError("optim: " + "; ".join(errors))


def decay_horizon(cfg: OptimConfig, total_steps: int) -> int:
    """Updates over which the LR decays: ``decay_steps``, else the run's ``total_steps``.

    A ``constant`` schedule without ``decay_steps`` never decays, so its horizon only has
    to clear the warmup (Megatron's scheduler asserts warmup < horizon): a short debug
    run of a recipe with a 10-step warmup then simply ends while still warming up.
    """
    if cfg.decay_steps:
        return cfg.decay_steps
    if cfg.decay_style == "constant":
        return max(total_steps, cfg.warmup_steps + 1)
    return total_steps


def check_schedule(cfg: OptimConfig, total_steps: int) -> int:
    """Megatron's scheduler needs warmup_steps < the decay horizon (strictly); returns
    that horizon (:func:`decay_horizon`)."""
    decay_steps = decay_horizon(cfg, total_steps)
    if total_steps < 1 or cfg.warmup_steps >= decay_steps:
        raise ValueError(f"optim: warmup_steps={cfg.warmup_steps} must be < the decay horizon "
                         f"{decay_steps} (decay_steps={cfg.decay_steps}, total_steps={total_steps})")
    return decay_steps


# ------------------------------------------------------------------ model, reference policy


@dataclasses.dataclass
class ReferenceConfig:
    """Reference-policy settings.

    Attributes:
        enabled: keep a reference model (needed when the loss has ``kl_coef > 0``).
        offload: keep its weights in host memory between uses (GPU only; no-op on CPU).
    """

    enabled: bool = True
    offload: bool = True


@dataclasses.dataclass
class ModelConfig:
    """The ``model`` section of both jobs: an HF Qwen2.5-VL checkpoint (``hf_dir``) and
    how to hold it — the GRPO policy, or the TRM that ``trm_train`` fine-tunes.

    ``tiny`` (GRPO only): a tiny random policy built into ``<output_dir>/tiny_model``
    instead (hidden 128, head_dim 64; the CPU main job).
    """

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
    at most ``max_sampling_rounds`` extra rounds (:mod:`~sophiavl_mcore.trainer.sampling`).
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


# ------------------------------------------------------------------ TRM job (SFT)


@dataclasses.dataclass
class SFTConfig:
    """SFT batch geometry (sizes in examples / tokens).

    Attributes:
        global_batch_size: examples per optimizer update, over all DP ranks.
        micro_batch_size: examples per forward/backward on one rank.
        max_seq_len: longest example (prompt + target tokens, image tokens included);
            longer ones are dropped and counted by the data code.
        pad_to_multiple_of: micro-batch length is rounded up to this.
        train_steps: optimizer updates in the run.
        log_every: console metrics every this many updates.
    """

    global_batch_size: int = 32
    micro_batch_size: int = 4
    max_seq_len: int = 4096
    pad_to_multiple_of: int = 8
    train_steps: int = 100
    log_every: int = 1

    def __post_init__(self) -> None:
        errors = []
        for name in ("global_batch_size", "micro_batch_size", "max_seq_len",
                     "pad_to_multiple_of", "train_steps", "log_every"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.micro_batch_size > self.global_batch_size:
            errors.append(f"micro_batch_size={self.micro_batch_size} exceeds "
                          f"global_batch_size={self.global_batch_size}")
        if errors:
            raise ValueError("sft: " + "; ".join(errors))

    def check_dp(self, dp: int) -> None:
        """The global batch must split evenly over ``dp`` data-parallel ranks."""
        if self.global_batch_size % dp:
            raise ValueError(f"sft.global_batch_size={self.global_batch_size} is not divisible by "
                             f"the data-parallel size dp={dp}")


@dataclasses.dataclass
class TRMDataConfig:
    """SophiaVL-R1-Thinking records; ``image_root`` defaults to the file's directory.

    The prompt is the TRM client's (:func:`~sophiavl_mcore.rewards.thinking.build_messages`):
    ``prompt_template`` / ``system_prompt`` are passed to it as they are (empty / None =
    the client's defaults), so serve the trained model with the same two settings
    (``rewards.thinking.prompt_template`` / ``system_prompt``).
    """

    path: str = ""
    image_root: str = ""
    seed: int = 1234
    shuffle: bool = True
    max_reasoning_chars: int = 12000  # as the TRM client truncates at inference
    prompt_template: str = ""
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        self.thinking_config()  # a template that cannot be read fails here, named

    def thinking_config(self) -> ThinkingRewardConfig:
        """The client settings that shape the prompt (everything else: defaults)."""
        extra = {} if self.system_prompt is None else {"system_prompt": self.system_prompt}
        return ThinkingRewardConfig(max_reasoning_chars=self.max_reasoning_chars,
                                    prompt_template=self.prompt_template, **extra)


@dataclasses.dataclass
class TRMTrainConfig:
    """Everything ``trm_train`` reads; unknown keys are errors (see :mod:`sophiavl_mcore.config`).

    ``images`` was ``image`` before the GRPO and TRM recipes shared section names; a
    recipe that still says ``image:`` is refused with a message naming the new key.
    """

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"image": "images"}

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: TRMDataConfig = dataclasses.field(default_factory=TRMDataConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    images: ImageConfig = dataclasses.field(default_factory=ImageConfig)
    output_dir: str = ""
    export_hf: bool = True

    def __post_init__(self) -> None:
        missing = [k for k, v in (("model.hf_dir", self.model.hf_dir), ("data.path", self.data.path),
                                  ("output_dir", self.output_dir)) if not v]
        if missing:
            raise ValueError(f"trm_train: {', '.join(missing)} must be set")
        if self.model.tiny:
            raise ValueError("trm_train: model.tiny is the GRPO job's stand-in policy; "
                             "set model.hf_dir to the checkpoint to fine-tune")
        check_schedule(self.optim, self.sft.train_steps)
