"""The reward stage's configuration: outcome reward, thinking reward (TRM client), the TRM
the job may serve itself, and Trust-GRPO. One section, used by the GRPO trainer
(``rewards:`` in a training recipe) and by the reward demo (:class:`DemoConfig`).

The TRM prompt's defaults live here too: the system prompt and the user-prompt template
file that ``rewards.thinking.prompt_template`` names (checked when the config is built).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Literal

from sophiavl_mcore.checks import check_int, check_real

SYSTEM_PROMPT = (
    "You are a meticulous grader of step-by-step reasoning. You judge the thinking "
    "process, not only the final answer."
)
DEFAULT_TEMPLATE = Path(__file__).with_name("templates") / "trm_default.txt"
TEMPLATE_FIELDS = ("{question}", "{reasoning}")


@functools.lru_cache(maxsize=16)
def load_prompt_template(path: str = "") -> str:
    """The TRM user-prompt template at ``path`` (empty: the package default), read once.

    A template is UTF-8 text containing ``{question}`` and ``{reasoning}``; other braces
    are kept as they are. One trailing newline (the usual end of a text file) is not
    part of the prompt. Raises ValueError (one line, naming the file) when the file
    cannot be read or a placeholder is missing.
    """
    file = Path(path) if path else DEFAULT_TEMPLATE
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"prompt_template {str(file)!r} cannot be read ({err})") from None
    missing = [f for f in TEMPLATE_FIELDS if f not in text]
    if missing:
        raise ValueError(f"prompt_template {str(file)!r} lacks the placeholder(s) "
                         f"{', '.join(missing)}; expected both {' and '.join(TEMPLATE_FIELDS)}")
    return text.removesuffix("\n")


# --------------------------------------------------------------------------- sections


@dataclasses.dataclass
class ThinkingRewardConfig:
    """TRM client settings (times in seconds).

    ``max_concurrency`` bounds requests in flight. A request is tried
    ``1 + max_retries`` times; the wait before retry k is
    ``min(backoff_max_s, backoff_base_s * 2**k)`` scaled by a random factor in
    [0.5, 1] (jitter, so clients do not retry in lockstep), or the server's
    ``Retry-After`` (429/503) when that is longer, capped at ``retry_after_max_s``.
    After ``breaker_threshold`` consecutive connection errors / timeouts / 5xx, the
    breaker opens: requests fail at once with ``circuit_open`` for
    ``breaker_cooldown_s``, then one probe request decides whether it closes.
    ``batch_deadline_s`` bounds a whole ``score()`` call; requests not finished by then
    are ``deadline`` failures. A reply body longer than ``max_reply_bytes`` is not read
    further (``too_large``). ``prompt_template``: path of the user-prompt template
    (empty = the package default, see :func:`load_prompt_template`); ``system_prompt``:
    the system message (empty = none).
    """

    backend: Literal["http", "in_process"] = "http"
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str | None = None
    model: str = "trm"
    max_concurrency: int = 64
    request_timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    max_retries: int = 3
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    retry_after_max_s: float = 30.0
    breaker_threshold: int = 16
    breaker_cooldown_s: float = 10.0
    batch_deadline_s: float | None = 600.0
    verify_tls: bool = True
    ca_bundle: str | None = None
    constrained: bool = True
    score_mode: Literal["greedy", "expected"] = "greedy"
    top_logprobs: int = 20
    max_tokens: int = 16
    max_reply_bytes: int = 1 << 20
    max_reasoning_chars: int = 12000
    image_format: Literal["PNG", "JPEG"] = "PNG"
    prompt_template: str = ""
    system_prompt: str = SYSTEM_PROMPT

    def __post_init__(self) -> None:
        errors = []
        if not self.base_url.startswith(("http://", "https://")):
            errors.append(f"base_url={self.base_url!r} must start with http:// or https://")
        if self.max_concurrency < 1:
            errors.append(f"max_concurrency={self.max_concurrency} must be >= 1")
        if self.request_timeout_s <= 0 or self.connect_timeout_s <= 0:
            errors.append(f"request_timeout_s={self.request_timeout_s} and connect_timeout_s="
                          f"{self.connect_timeout_s} must be > 0")
        if self.max_retries < 0:
            errors.append(f"max_retries={self.max_retries} must be >= 0")
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            errors.append(f"need 0 <= backoff_base_s={self.backoff_base_s} <= backoff_max_s="
                          f"{self.backoff_max_s}")
        if self.retry_after_max_s < 0:
            errors.append(f"retry_after_max_s={self.retry_after_max_s} must be >= 0")
        if self.breaker_threshold < 1 or self.breaker_cooldown_s < 0:
            errors.append(f"breaker_threshold={self.breaker_threshold} must be >= 1 and "
                          f"breaker_cooldown_s={self.breaker_cooldown_s} >= 0")
        if self.batch_deadline_s is not None and self.batch_deadline_s <= 0:
            errors.append(f"batch_deadline_s={self.batch_deadline_s} must be > 0 or null")
        if not 1 <= self.top_logprobs <= 20:
            errors.append(f"top_logprobs={self.top_logprobs} must be in [1, 20]")
        if self.max_tokens < 12:
            errors.append(f"max_tokens={self.max_tokens} must be >= 12 to fit <answer>x.y</answer>")
        if self.max_reply_bytes < 4096:
            errors.append(f"max_reply_bytes={self.max_reply_bytes} must be >= 4096")
        try:
            load_prompt_template(self.prompt_template)
        except ValueError as err:
            errors.append(str(err))
        if errors:
            raise ValueError("rewards.thinking: " + "; ".join(errors))


@dataclasses.dataclass
class TrustGRPOConfig:
    """Trust-GRPO and advantage settings (defaults: the paper's).

    Attributes:
        alpha: weight α of the thinking reward (paper: 0.3).
        correct_threshold: a response is correct iff its outcome reward ≥ this.
        use_trust: γ from the correct/wrong contrast (False ⇒ γ = 1).
        use_annealing: multiply by e^(−step/T) (False ⇒ 1).
        use_thinking: add the thinking reward at all (False ⇒ plain GRPO, R = R^o).
        unpaired_gamma: γ of a group lacking scored correct or scored wrong members.
        adv_eps: ε in (R − mean) / (std + ε).
        scale_by_std: divide by the group std (False ⇒ Dr.GRPO, R − mean).
        std_ddof: 1 = unbiased std (torch.std, as in verl/TRL), 0 = population std.
        thinking_min_outcome: R^t is kept only where R^o ≥ this, else 0 (None = all kept;
            published code: 0.2).
        skip_uniform_groups: no thinking reward in groups whose outcomes are all ≥
            ``skip_high`` or all ≤ ``skip_low`` (published code: True with 0.9 / 0.1).
        annealing_steps: T of e^(−step/T) in optimizer steps (None = total steps).
    """

    alpha: float = 0.3
    correct_threshold: float = 0.5
    use_trust: bool = True
    use_annealing: bool = True
    use_thinking: bool = True
    unpaired_gamma: float = 1.0
    adv_eps: float = 1e-6
    scale_by_std: bool = True
    std_ddof: int = 1
    thinking_min_outcome: float | None = None
    skip_uniform_groups: bool = False
    skip_high: float = 0.9
    skip_low: float = 0.1
    annealing_steps: int | None = None

    def __post_init__(self) -> None:
        check_real("alpha", self.alpha, minimum=0.0)
        check_real("correct_threshold", self.correct_threshold)
        check_real("skip_high", self.skip_high)
        check_real("skip_low", self.skip_low)
        if self.thinking_min_outcome is not None:
            check_real("thinking_min_outcome", self.thinking_min_outcome)
        if self.annealing_steps is not None and (
                check_int("annealing_steps", self.annealing_steps) <= 0):
            raise ValueError(f"annealing_steps must be > 0 or None, got {self.annealing_steps}")
        check_real("unpaired_gamma", self.unpaired_gamma, minimum=0.0)
        check_real("adv_eps", self.adv_eps, minimum=0.0)
        for name in ("use_trust", "use_annealing", "use_thinking", "scale_by_std",
                     "skip_uniform_groups"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.std_ddof not in (0, 1) or isinstance(self.std_ddof, bool):
            raise ValueError(f"std_ddof must be 0 or 1, got {self.std_ddof!r}")


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
        tiny_records: images in the tiny TRM's training set (3 anchors and 8 graded
            replies each, :data:`~sophiavl_mcore.testing.tiny_trm.SAMPLES_PER_IMAGE`).
        tiny_heldout: held-out images (4 graded replies each) for its agreement figures.
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


@dataclasses.dataclass
class RewardsConfig:
    """Outcome + thinking rewards; the paper's ablation switches live in ``trust_grpo``.

    Attributes:
        format_weight: weight of the optional format reward added to R^o (0 = the
            paper's format gate only).
        trust_grpo: γ, annealing, α, the ablation switches and the faithful modes.
        thinking: the TRM client; ``http`` talks to an OpenAI-compatible server (``vllm
            serve``), ``in_process`` grades with the colocated rollout engine.
        trm: a TRM server the job starts itself (``trm.serve``); when on, ``thinking``
            is pointed at it (backend ``http``, its URL) at start-up.
    """

    format_weight: float = 0.0
    trust_grpo: TrustGRPOConfig = dataclasses.field(default_factory=TrustGRPOConfig)
    thinking: ThinkingRewardConfig = dataclasses.field(
        default_factory=lambda: ThinkingRewardConfig(backend="in_process"))
    trm: LocalTRMConfig = dataclasses.field(default_factory=LocalTRMConfig)


@dataclasses.dataclass
class DemoConfig:
    """The demo reads only the reward section (defaults ← recipe ← overrides)."""

    rewards: RewardsConfig = dataclasses.field(default_factory=RewardsConfig)
