"""Thinking reward R^t: batched, fault-tolerant scoring by the Thinking Reward Model.

One interface, :class:`ThinkingRewardClient`, two backends:

* :class:`~sophiavl_mcore.rewards.trm_http.VllmServerThinkingClient` (in
  ``rewards/trm_http.py``, importable from here) — an OpenAI-compatible chat endpoint
  (``vllm serve``): asyncio + aiohttp, bounded concurrency, per-request timeouts, retries
  with exponential backoff and jitter that honour ``Retry-After``, replies read up to
  ``max_reply_bytes``, an API-key header, http(s) URLs, and a circuit breaker so a dead
  server costs seconds, not the retry budget of every request.
* :class:`InProcessThinkingClient` — a colocated :class:`~sophiavl_mcore.rollout.RolloutEngine`.

Failure policy: ``score()`` never raises because of the server or a reply. A response
that could not be scored gets NaN (Trust-GRPO leaves it out of μc/μw), and
:class:`ThinkingScores` counts failures per reason (``timeout``, ``connection`` — also a
connection cut in the middle of a reply —, ``http_<code>``, ``parse``, ``malformed``,
``too_large``, ``client_error``, ``circuit_open``, ``deadline``, ``bad_request``,
``too_long``, ``engine_error``, ``internal``), reported as ``reward/trm_fail_<reason>``.

The prompt is a system message (``system_prompt``) and the user text from a template
file (``prompt_template``; default: ``templates/trm_default.txt`` in this package) with
``{question}`` and ``{reasoning}`` filled in, so that a TRM trained on another prompt
(the released SophiaVL-R1 TRM) is asked the way it was trained. The TRM answers
``<answer>s</answer>``; constrained decoding (vLLM structured outputs, a regex over
s in {0.0, 0.1, ..., 1.0}) makes every reply of a vLLM server parse. :func:`parse_score`
accepts exactly two forms: one ``<answer>s</answer>`` tag (text around it allowed) or a
bare score ``s``, with s a number in [0, 1]; anything else is a ``parse`` failure.
``score_mode="expected"`` reads the probability-weighted mean score from the log-probs
of the score tokens instead of the greedy token.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from sophiavl_mcore.rewards.config import ThinkingRewardConfig, load_prompt_template

logger = logging.getLogger(__name__)

SCORE_CHOICES: tuple[str, ...] = tuple(f"{k / 10:.1f}" for k in range(11))
SCORE_REGEX = r"<answer>(0\.[0-9]|1\.0)</answer>"

# The default template's text (kept under its old name for callers that key on it).
INSTRUCTION = load_prompt_template()


# --------------------------------------------------------------------------- types


@dataclasses.dataclass
class ThinkingRequest:
    """One response to grade: the question text, its images, and the reasoning."""

    question: str
    reasoning: str
    images: Sequence[Any] = ()


@dataclasses.dataclass
class ThinkingScores:
    """``scores``: float32 [N] in [0, 1], NaN where missing; ``failures``: reason -> count."""

    scores: np.ndarray
    failures: dict[str, int]
    elapsed_s: float = 0.0

    @property
    def num_missing(self) -> int:
        return int(np.isnan(self.scores).sum())

    def metrics(self, prefix: str = "reward/trm") -> dict[str, float]:
        """Scalars for TensorBoard: failure counts per reason, missing fraction."""
        out = {f"{prefix}_fail_{reason}": float(n) for reason, n in sorted(self.failures.items())}
        n = max(len(self.scores), 1)
        out[f"{prefix}_missing_frac"] = self.num_missing / n
        out[f"{prefix}_score_time_s"] = self.elapsed_s
        return out


class ThinkingRewardClient(abc.ABC):
    """Scores reasoning with the TRM; never raises on server or reply failures."""

    @abc.abstractmethod
    def score(self, requests: Sequence[ThinkingRequest]) -> ThinkingScores:
        """Score every request; see :class:`ThinkingScores`."""

    @property
    def collective(self) -> bool:
        """True when :meth:`score` is a collective over the rollout engine's ranks (the TRM
        runs on that SPMD engine): every rank of the engine must call it with the same
        requests. False (a server, a local model): one rank may ask for all of them and
        share the scores."""
        return False

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections / threads."""

    def __enter__(self) -> ThinkingRewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- prompt & parsing


def build_messages(req: ThinkingRequest, cfg: ThinkingRewardConfig,
                   image_parts: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """OpenAI-style chat messages for one request (images first, then the instruction).

    ``image_parts`` are ready content parts (HTTP: ``image_url`` data URLs); by default
    one ``{"type": "image"}`` placeholder per image (in-process rendering).
    """
    reasoning = req.reasoning
    if len(reasoning) > cfg.max_reasoning_chars:
        # Keep the end: the conclusion matters for most criteria.
        reasoning = "[...]" + reasoning[-cfg.max_reasoning_chars:]
    parts = image_parts if image_parts is not None else [{"type": "image"} for _ in req.images]
    # str.replace, not str.format: a template may hold other braces (JSON examples).
    text = (load_prompt_template(cfg.prompt_template)
            .replace("{question}", req.question.strip())
            .replace("{reasoning}", reasoning.strip()))
    messages: list[dict[str, Any]] = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": [*parts, {"type": "text", "text": text}]})
    return messages


_SCORE = r"(?:0(?:\.\d+)?|1(?:\.0+)?|\.\d+)"
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_SCORE_RE = re.compile(rf"\s*({_SCORE})\s*")


def parse_score(text: str) -> float | None:
    """Score in [0, 1] from a TRM reply, or None when the reply is not one of the two
    accepted forms: exactly one ``<answer>s</answer>`` tag (any text around it), or the
    bare score ``s`` alone; s is ``0``, ``1``, ``0.x…``, ``1.0…`` or ``.x…``.

    Numbers elsewhere in the text are never read ("0.7 out of 1", "Score 0.9 on a 0 to
    1 scale" and an unclosed ``<answer>0.3`` are None).
    """
    if not isinstance(text, str):
        return None
    tags = _ANSWER_TAG_RE.findall(text)
    if len(tags) > 1 or (not tags and "<answer>" in text.lower()):
        return None
    match = _SCORE_RE.fullmatch(tags[0] if tags else text)
    return float(match[1]) if match else None


def expected_score(tokens: Sequence[tuple[str, float, Sequence[tuple[str, float]]]]) -> float | None:
    """Probability-weighted mean score from per-token log-probs of a reply.

    ``tokens``: per generated position ``(chosen_text, chosen_logprob, alternatives)``
    with ``alternatives`` the top (text, logprob) pairs. Along the greedy path each
    alternative token inside the score span leads to the set of choices in
    :data:`SCORE_CHOICES` consistent with it; its probability mass gets the mean of
    that set (exact when the set has one element, e.g. the tenths digit, or "1"
    versus "0."; a uniform approximation when the subtree was never expanded).
    Returns None when the reply has no parsable score.
    """
    text = "".join(t for t, _, _ in tokens)
    m = re.search(r"<answer>\s*", text)
    if m is None:
        return None
    start = m.end()
    greedy = parse_score(text)
    if greedy is None:
        return None
    end = start + len(re.match(r"[0-9.]*", text[start:]).group(0))
    total_mass = total_value = 0.0
    path_logp = 0.0
    offset = 0
    for chosen, chosen_lp, alts in tokens:
        tok_start, offset = offset, offset + len(chosen)
        if offset <= start:
            continue
        if tok_start >= end:
            break
        for alt, lp in alts:
            if alt == chosen or not math.isfinite(lp):
                continue
            full = text[:tok_start] + alt
            if len(full) <= start or full[:start] != text[:start]:
                continue
            core, closed = full[start:].split("<")[0].strip(), "<" in full[start:]
            consistent = [float(c) for c in SCORE_CHOICES
                          if (c == core if closed else c.startswith(core))]
            if not consistent:
                continue
            mass = math.exp(path_logp + lp)
            total_mass += mass
            total_value += mass * float(np.mean(consistent))
        path_logp += chosen_lp if math.isfinite(chosen_lp) else 0.0
    path_mass = math.exp(path_logp)
    total_mass += path_mass
    total_value += path_mass * greedy
    return total_value / total_mass if total_mass > 0 else greedy


class _Failure(Exception):
    """One failed attempt: the reason counted, whether a retry may help, and the wait
    the server asked for (``Retry-After``), if any."""

    def __init__(self, reason: str, retryable: bool, detail: str = "",
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.retryable, self.detail = reason, retryable, detail
        self.retry_after_s = retry_after_s


def _score_from_reply(text: str, token_logprobs: list | None, mode: str) -> float:
    """Score of one reply, or raise ``_Failure('parse')``."""
    value: float | None = None
    if mode == "expected" and token_logprobs:
        value = expected_score(token_logprobs)
    if value is None:  # greedy mode, or a bare score (no <answer> span to weigh)
        value = parse_score(text)
    if value is None:
        raise _Failure("parse", retryable=False, detail=f"no score in reply {text[:80]!r}")
    return float(value)


# --------------------------------------------------------------------------- in-process backend


class InProcessThinkingClient(ThinkingRewardClient):
    """TRM on a colocated rollout engine (greedy, constrained, one batched call).

    Prompts longer than the engine's context are failed up front (``too_long``); a
    batch that still fails is bisected so that a bad request only loses its own score.
    """

    def __init__(self, engine: Any, cfg: ThinkingRewardConfig) -> None:
        from sophiavl_mcore.rollout.config import SamplingConfig

        self.engine, self.cfg = engine, cfg
        self._sampling = SamplingConfig(
            n=1, temperature=0.0, max_tokens=cfg.max_tokens, seed=0,
            logprobs=cfg.top_logprobs if cfg.score_mode == "expected" else 0,
            regex=SCORE_REGEX if cfg.constrained else None,
        )

    @property
    def collective(self) -> bool:
        """It generates on a rollout engine, whose ``generate`` every engine rank drives."""
        return True

    def score(self, requests: Sequence[ThinkingRequest]) -> ThinkingScores:
        from sophiavl_mcore.rollout.interface import RolloutRequest

        t0 = time.monotonic()
        n = len(requests)
        scores = np.full(n, np.nan, dtype=np.float32)
        failures: Counter[str] = Counter()
        prompts: list[tuple[int, Any]] = []
        max_len = getattr(self.engine, "max_model_len", None)
        tok = getattr(self.engine, "tokenizer", None)
        for i, req in enumerate(requests):
            try:
                text = self.engine.chat_prompt(build_messages(req, self.cfg))
                if max_len and tok is not None and (
                        len(tok.encode(text)) + self.cfg.max_tokens > max_len):
                    # Checked here because one over-long prompt fails vLLM's whole batch.
                    failures["too_long"] += 1
                    continue
                prompts.append((i, RolloutRequest(prompt=text, images=list(req.images))))
            except Exception as err:
                failures["bad_request"] += 1
                logger.warning("TRM request %d could not be rendered: %r", i, err)
        pairs = self._generate_robust(prompts, failures)
        for (i, _), res in pairs:
            sample = res.samples[0]
            toks = None
            if self.cfg.score_mode == "expected" and sample.top_logprobs is not None:
                toks = self._token_logprobs(sample)
            try:
                scores[i] = _score_from_reply(sample.text, toks, self.cfg.score_mode)
            except _Failure as f:
                failures[f.reason] += 1
        return ThinkingScores(scores, dict(failures), time.monotonic() - t0)

    def _generate_robust(self, items: list[tuple[int, Any]],
                         failures: Counter[str]) -> list[tuple[tuple[int, Any], Any]]:
        """Generate for all items; a failing batch is bisected so that only the
        offending requests lose their score (log2(N) extra calls per bad request)."""
        if not items:
            return []
        try:
            results = self.engine.generate([p for _, p in items], self._sampling)
            return list(zip(items, results, strict=True))
        except Exception as err:
            if len(items) == 1:
                failures["engine_error"] += 1
                logger.warning("TRM request %d failed in the engine: %r", items[0][0], err)
                return []
            logger.warning("TRM batch of %d failed (%r); bisecting", len(items), err)
        mid = len(items) // 2
        return (self._generate_robust(items[:mid], failures)
                + self._generate_robust(items[mid:], failures))

    def _token_logprobs(self, sample) -> list[tuple[str, float, list[tuple[str, float]]]]:
        tok = getattr(self.engine, "tokenizer", None)
        out = []
        for t, tid in enumerate(sample.token_ids.tolist()):
            chosen = tok.decode([tid]) if tok is not None else ""
            out.append((chosen, float(sample.logprobs[t]), sample.top_logprobs[t]))
        return out
