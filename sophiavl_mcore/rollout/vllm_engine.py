"""vLLM rollout engine living in the training process (colocated).

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni``
executor) so that weight updates pass tensors by reference: ``load_weights`` hands an
iterator of HF-named tensors to the worker's
``model_runner.reload_weights(weights_iterator=...)`` (vLLM 0.32:
``LLM.collective_rpc("reload_weights")`` -> ``Worker.reload_weights`` ->
``GPUModelRunner.reload_weights`` -> ``model.load_weights``, which applies the model's
own HF -> vLLM name mapping and fuses q/k/v and gate/up). On GPU, sleep mode moves
weights and KV cache out of device memory while the trainer runs.

Scripts that build an engine need an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from sophiavl_mcore.rollout.config import RolloutConfig, SamplingConfig
from sophiavl_mcore.rollout.interface import (
    RolloutEngine,
    RolloutRequest,
    RolloutResult,
    RolloutSample,
    RolloutWeightError,
    vision_token_ids,
)

logger = logging.getLogger(__name__)


class _OnceFilter(logging.Filter):
    """Lets a repeated library warning through once. vLLM's CPU worker replaces
    ``torch.set_num_threads`` with a warning (its threads are fixed after start-up), and
    vLLM's own multimodal renderer then "sets" threads around every request: the calls
    are harmless no-ops (threads stay at OMP_NUM_THREADS), the warning would flood the
    log (~20k lines in the main job)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen = text, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        first, self.seen = not self.seen, True
        return first


def _quiet_repeated_warnings() -> None:
    worker_log = logging.getLogger("vllm.v1.worker.cpu_worker")
    if not any(isinstance(f, _OnceFilter) for f in worker_log.filters):
        worker_log.addFilter(_OnceFilter("torch.set_num_threads"))


def _prepare_environment(cfg: RolloutConfig) -> None:
    """Environment vLLM reads at engine construction (must precede ``LLM(...)``)."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":
        # A separate engine-core process would copy every weight tensor on sync.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gb))
    _quiet_repeated_warnings()


def _finalize_reload_on_worker(worker: Any) -> None:
    """Runs on each vLLM worker (via ``collective_rpc``) after a failed reload."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    runner = worker.model_runner
    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(runner.get_model(), worker.vllm_config.model_config)
    runner.reset_encoder_cache()
    runner.reset_mm_cache()


def to_sampling_params(sampling: SamplingConfig, seed_offset: int = 0,
                       forbidden_ids: Sequence[int] = ()):
    """Build vLLM ``SamplingParams``; the seed (if any) is shifted by ``seed_offset``;
    ``forbidden_ids`` get vLLM's strongest logit bias (-100, i.e. never sampled)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = StructuredOutputsParams(regex=sampling.regex) if sampling.regex else None
    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else 0,
        max_tokens=sampling.max_tokens,
        stop=list(sampling.stop) or None,
        seed=None if sampling.seed is None else sampling.seed + seed_offset,
        logprobs=sampling.logprobs,
        structured_outputs=structured,
        logit_bias={int(i): -100.0 for i in forbidden_ids} or None,
    )


class VllmRolloutEngine(RolloutEngine):
    """:class:`RolloutEngine` on an in-process ``vllm.LLM``.

    ``data_parallel_size`` > 1 (with ``external_launcher``): this rank is part of one of
    several SPMD engines in the caller's world (:mod:`sophiavl_mcore.rollout.spmd`).
    """

    def __init__(self, cfg: RolloutConfig, data_parallel_size: int = 1) -> None:
        if not cfg.model:
            raise ValueError("rollout.model is empty: set it to an HF checkpoint directory")
        if not os.path.isdir(cfg.model):
            raise FileNotFoundError(f"rollout.model={cfg.model!r} is not a directory")
        _prepare_environment(cfg)
        from vllm import LLM
        from vllm.platforms import current_platform

        self.cfg = cfg
        self._data_parallel_size = data_parallel_size
        self.policy_version = 0
        self._sleeping = False
        self._asleep_tags: set[str] = set()
        self._sleep_supported = bool(
            cfg.enable_sleep_mode and current_platform.is_sleep_mode_available()
        )
        if cfg.enable_sleep_mode and not self._sleep_supported:
            logger.info("sleep mode unavailable on %s; sleep()/wake_up() are no-ops",
                        current_platform.device_name)
        kwargs: dict[str, Any] = dict(
            model=cfg.model,
            tokenizer=cfg.tokenizer or cfg.model,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            data_parallel_size=data_parallel_size,
            distributed_executor_backend=cfg.distributed_executor_backend,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=cfg.enable_prefix_caching,
            enable_sleep_mode=self._sleep_supported,
            logprobs_mode=cfg.logprobs_mode,
            max_logprobs=20,
            seed=cfg.seed,
        )
        if current_platform.is_cuda_alike():
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.max_images_per_prompt > 0 and self._is_multimodal(cfg.model):
            kwargs["limit_mm_per_prompt"] = {"image": cfg.max_images_per_prompt, "video": 0}
        self._llm = LLM(**kwargs)
        if data_parallel_size > 1:
            # SPMD engines are independent replicas of a dense model: without this,
            # vLLM's external-launcher DP polls every engine's "unfinished requests" with
            # an all-reduce at each engine step (idle engines run dummy batches), which
            # deadlocks as soon as engines are called with different work or different
            # numbers of times (validation splits, dynamic sampling, a TRM on the engine).
            self._llm.llm_engine.dp_group = None
        self._tokenizer = self._llm.get_tokenizer()
        self._vision_ids = vision_token_ids(self._tokenizer)

    @staticmethod
    def _is_multimodal(model_dir: str) -> bool:
        import json

        try:
            with open(os.path.join(model_dir, "config.json")) as f:
                return "vision_config" in json.load(f)
        except (OSError, ValueError):
            return False

    @property
    def llm(self):
        """The underlying ``vllm.LLM`` (for tests and diagnostics)."""
        return self._llm

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        """Longest prompt + response (tokens) the engine accepts."""
        return self.cfg.max_model_len

    # ------------------------------------------------------------------ generation

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        return self._tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def generate(
        self, requests: Sequence[RolloutRequest], sampling: SamplingConfig | None = None
    ) -> list[RolloutResult]:
        """Sample responses; ``sampling`` defaults to ``cfg.sampling``.

        Returns one :class:`RolloutResult` per request, in request order, each with
        ``sampling.n`` samples.
        """
        if self._sleeping:
            raise RuntimeError("generate() called while the rollout engine sleeps; call wake_up()")
        sampling = sampling or self.cfg.sampling
        if not requests:
            return []
        prompts = [self._to_vllm_prompt(i, r) for i, r in enumerate(requests)]
        forbidden = self._vision_ids if sampling.forbid_vision_tokens else ()
        params = [to_sampling_params(sampling, seed_offset=i, forbidden_ids=forbidden)
                  for i in range(len(requests))]
        try:
            with self._independent():
                outputs = self._llm.generate(prompts, params, use_tqdm=False)
        except Exception:
            # An error inside the engine loop leaves this call's requests scheduled;
            # the next generate() would run (and fail on) them again.
            self._abort_unfinished()
            raise
        return [self._to_result(out, sampling) for out in outputs]

    def _independent(self) -> Any:
        """SPMD engines (``data_parallel_size`` > 1) are independent replicas of a dense
        model: vLLM would otherwise also all-reduce batch padding across them at every
        forward (``coordinate_batch_across_dp``, for MoE / CUDA-graph padding)."""
        import contextlib

        if self._data_parallel_size == 1:
            return contextlib.nullcontext()
        from vllm.v1.worker.dp_utils import skip_dp_coordination

        return skip_dp_coordination()

    def _abort_unfinished(self) -> None:
        engine = self._llm.llm_engine
        try:
            ids = list(engine.output_processor.request_states.keys())
            if ids:
                logger.warning("aborting %d unfinished request(s) after an engine error", len(ids))
                engine.abort_request(ids, internal=True)
            self.invalidate_caches()
        except Exception as err:
            logger.error("could not clean up after an engine error: %r", err)

    def _to_vllm_prompt(self, index: int, req: RolloutRequest) -> dict[str, Any]:
        prompt: dict[str, Any]
        if req.prompt_token_ids is not None:
            prompt = {"prompt_token_ids": list(req.prompt_token_ids)}
        else:
            prompt = {"prompt": req.prompt}
        images = list(req.images)
        if images:
            if len(images) > self.cfg.max_images_per_prompt:
                raise ValueError(
                    f"request {index}: {len(images)} images but rollout.max_images_per_prompt="
                    f"{self.cfg.max_images_per_prompt}"
                )
            prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        return prompt

    @staticmethod
    def _to_result(out, sampling: SamplingConfig) -> RolloutResult:
        samples = []
        for comp in out.outputs:
            ids = np.asarray(comp.token_ids, dtype=np.int64)
            lps = np.full(len(ids), math.nan, dtype=np.float32)
            top: list[list[tuple[str, float]]] | None = [] if sampling.logprobs > 0 else None
            for t, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs or [], strict=False)):
                if tok in entry:
                    lps[t] = entry[tok].logprob
                if top is not None:
                    top.append([(lp.decoded_token or "", float(lp.logprob))
                                for lp in entry.values()])
            samples.append(RolloutSample(
                token_ids=ids, logprobs=lps, text=comp.text,
                finish_reason=str(comp.finish_reason), stop_reason=comp.stop_reason,
                top_logprobs=top,
            ))
        return RolloutResult(prompt_token_ids=np.asarray(out.prompt_token_ids, dtype=np.int64),
                             samples=samples)

    # ------------------------------------------------------------------ weights

    def load_weights(
        self, weights: Iterable[tuple[str, Any]], version: int | None = None
    ) -> int:
        """Stream HF-named full tensors into the engine (in place, no extra copy).

        The iterator is consumed lazily by the model's loader, so a bucketed producer
        keeps at most one bucket alive. Returns the new ``policy_version``.
        """
        if self._sleeping:
            # Weights must be resident to be written; the KV cache can stay asleep.
            self.wake_up(tags=["weights"])
        state = {"count": 0, "last": None}

        def counted() -> Iterator[tuple[str, Any]]:
            for name, tensor in weights:
                state["count"] += 1
                state["last"] = name
                yield name, tensor

        try:
            self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
        except Exception as err:
            self._recover_after_failed_reload()
            raise RolloutWeightError(
                f"weight update to version {version if version is not None else self.policy_version + 1} "
                f"failed after {state['count']} tensor(s) (last: {state['last']!r}); engine stays "
                f"at policy_version={self.policy_version}, its weights may be partly updated: {err}"
            ) from err
        if state["count"] == 0:
            raise RolloutWeightError("load_weights got an empty iterator; nothing was loaded")
        self.invalidate_caches()
        self.policy_version = self.policy_version + 1 if version is None else int(version)
        logger.debug("loaded %d tensors, policy_version=%d", state["count"], self.policy_version)
        return self.policy_version

    def _recover_after_failed_reload(self) -> None:
        # vLLM's in-place reload first moves every layer's parameters to the meta
        # device and restores them in its finalize step; an exception in between would
        # leave a model that cannot run. Finalizing puts the previous tensors back for
        # every layer that was not fully loaded.
        try:
            self._llm.collective_rpc(_finalize_reload_on_worker)
        except Exception as err:
            logger.error("could not restore the engine after a failed weight update: %r", err)
        self.invalidate_caches()

    def invalidate_caches(self) -> None:
        """Drop prefix KV, encoder outputs (scheduler *and* worker side) and the
        front-end multimodal cache: all were computed with the previous weights. Call
        after any write to the weights, even a partial one."""
        # Dropping only one side leaves the scheduler believing an encoder output is
        # cached that the worker no longer has ("Encoder cache miss").
        self._llm.reset_mm_cache()
        self._llm.llm_engine.reset_encoder_cache()
        self._llm.reset_prefix_cache()

    # ------------------------------------------------------------------ lifecycle

    @property
    def sleeping(self) -> bool:
        return self._sleeping

    def sleep(self) -> None:
        if self._sleeping:
            return
        if self._sleep_supported:
            self._llm.sleep(level=self.cfg.sleep_level)
        self._asleep_tags = {"weights", "kv_cache"}
        self._sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        if not self._sleeping:
            return
        wanted = set(self._asleep_tags) if tags is None else set(tags) & self._asleep_tags
        if self._sleep_supported and wanted:
            self._llm.wake_up(tags=sorted(wanted))
        self._asleep_tags -= wanted
        if not self._asleep_tags:
            if self._sleep_supported:
                self._llm.reset_prefix_cache()
            self._sleeping = False

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as err:  # best effort: the process may be exiting anyway
            logger.debug("engine shutdown: %s", err)
        del llm
        gc.collect()

