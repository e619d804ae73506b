"""Thinking reward R^t: batched, fault-tolerant scoring by the Thinking Reward Model.

One interface, :class:`ThinkingRewardClient`, two backends:

* :class:`VllmServerThinkingClient` — an OpenAI-compatible chat endpoint (``vllm
  serve``): asyncio + aiohttp, bounded concurrency, per-request timeouts, retries with
  exponential backoff and jitter, an API-key header, http(s) URLs, and a circuit
  breaker so a dead server costs seconds, not the retry budget of every request.
* :class:`InProcessThinkingClient` — a colocated :class:`~sophiavl_mcore.rollout.RolloutEngine`.

Failure policy: ``score()`` never raises because of the server or a reply. A response
that could not be scored gets NaN (Trust-GRPO leaves it out of μc/μw), and
:class:`ThinkingScores` counts failures per reason (``timeout``, ``connection``,
``http_<code>``, ``parse``, ``malformed``, ``client_error``, ``circuit_open``,
``deadline``, ``bad_request``, ``too_long``, ``engine_error``, ``internal``), reported as
``reward/trm_fail_<reason>``.

The TRM answers ``<answer>s</answer>`` with s in {0.0, 0.1, ..., 1.0}; constrained
decoding (vLLM structured outputs, a regex) makes every reply parse, and the parser is
tolerant anyway. ``score_mode="expected"`` reads the probability-weighted mean score
from the log-probs of the score tokens instead of the greedy token.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import dataclasses
import io
import logging
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

SCORE_CHOICES: tuple[str, ...] = tuple(f"{k / 10:.1f}" for k in range(11))
SCORE_REGEX = r"<answer>(0\.[0-9]|1\.0)</answer>"

SYSTEM_PROMPT = (
    "You are a meticulous grader of step-by-step reasoning. You judge the thinking "
    "process, not only the final answer."
)

INSTRUCTION = """Below are a question (with its image, if any) and a model's reasoning for it.

Question:
{question}

Reasoning to evaluate:
{reasoning}

Judge the reasoning as a whole on five criteria:
1. Logical soundness: every step follows from the question, the image and earlier steps; no leaps or contradictions.
2. Correct reasoning: facts, reading of the image, calculations and methods are right.
3. Error identification: the reasoning notices and fixes its own mistakes instead of building on them.
4. Language consistency: it stays in one language and uses terms and notation consistently.
5. Redundancy: no needless repetition, loops or padding; every step contributes.

Give one overall score from 0 (worthless reasoning) to 1 (flawless reasoning) in steps of 0.1.
Reply with the score only, exactly in this format: <answer>score</answer>"""


# --------------------------------------------------------------------------- config


@dataclasses.dataclass
class ThinkingRewardConfig:
    """TRM client settings (times in seconds).

    ``max_concurrency`` bounds requests in flight. A request is tried
    ``1 + max_retries`` times; the wait before retry k is
    ``min(backoff_max_s, backoff_base_s * 2**k)`` scaled by a random factor in
    [0.5, 1] (jitter, so clients do not retry in lockstep). After
    ``breaker_threshold`` consecutive connection errors / timeouts / 5xx, the breaker
    opens: requests fail at once with ``circuit_open`` for ``breaker_cooldown_s``,
    then one probe request decides whether it closes. ``batch_deadline_s`` bounds a
    whole ``score()`` call; requests not finished by then are ``deadline`` failures.
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
    breaker_threshold: int = 16
    breaker_cooldown_s: float = 10.0
    batch_deadline_s: float | None = 600.0
    verify_tls: bool = True
    ca_bundle: str | None = None
    constrained: bool = True
    score_mode: Literal["greedy", "expected"] = "greedy"
    top_logprobs: int = 20
    max_tokens: int = 16
    max_reasoning_chars: int = 12000
    image_format: Literal["PNG", "JPEG"] = "PNG"

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
        if self.breaker_threshold < 1 or self.breaker_cooldown_s < 0:
            errors.append(f"breaker_threshold={self.breaker_threshold} must be >= 1 and "
                          f"breaker_cooldown_s={self.breaker_cooldown_s} >= 0")
        if self.batch_deadline_s is not None and self.batch_deadline_s <= 0:
            errors.append(f"batch_deadline_s={self.batch_deadline_s} must be > 0 or null")
        if not 1 <= self.top_logprobs <= 20:
            errors.append(f"top_logprobs={self.top_logprobs} must be in [1, 20]")
        if self.max_tokens < 12:
            errors.append(f"max_tokens={self.max_tokens} must be >= 12 to fit <answer>x.y</answer>")
        if errors:
            raise ValueError("rewards.thinking: " + "; ".join(errors))


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
    text = INSTRUCTION.format(question=req.question.strip(), reasoning=reasoning.strip())
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [*parts, {"type": "text", "text": text}]},
    ]


_ANSWER_RE = re.compile(r"<answer>\s*([-+]?\d*\.?\d+)\s*(?:</answer>|$)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"[-+]?\d*\.?\d+")


def parse_score(text: str) -> float | None:
    """Score in [0, 1] from a TRM reply, or None when there is none.

    Accepts ``<answer>0.7</answer>``, an unclosed ``<answer>0.7``, spaces, and as a
    last resort the last number in the text. Values outside [0, 1] are rejected.
    """
    if not isinstance(text, str):
        return None
    matches = _ANSWER_RE.findall(text)
    candidates = matches or _NUMBER_RE.findall(text)[-1:]
    if not candidates:
        return None
    try:
        value = float(candidates[-1])
    except ValueError:
        return None
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        return None
    return value


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


def _image_to_data_url(image: Any, fmt: str) -> str:
    """data: URL for a PIL image, HWC uint8 array, encoded bytes or a file path."""
    from PIL import Image

    if isinstance(image, str):
        if image.startswith(("data:", "http://", "https://")):
            return image
        with open(image, "rb") as f:
            image = f.read()
    if isinstance(image, (bytes, bytearray)):
        raw = bytes(image)
        mime = "image/png" if raw[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
        return f"data:{mime};base64," + base64.b64encode(raw).decode()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image of type {type(image).__name__}; expected PIL image, "
                        "HWC uint8 array, bytes or a path")
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


class _Failure(Exception):
    def __init__(self, reason: str, retryable: bool, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.retryable, self.detail = reason, retryable, detail


def _score_from_reply(text: str, token_logprobs: list | None, mode: str) -> float:
    """Score of one reply, or raise ``_Failure('parse')``."""
    value: float | None
    if mode == "expected" and token_logprobs:
        value = expected_score(token_logprobs)
    else:
        value = parse_score(text)
    if value is None:
        raise _Failure("parse", retryable=False, detail=f"no score in reply {text[:80]!r}")
    return float(value)


# --------------------------------------------------------------------------- HTTP backend


class _CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; half-open after ``cooldown_s``.

    While open every request fails at once. Once the cooldown has passed a single
    probe request goes through; the others wait for its outcome, which closes the
    breaker (all proceed) or re-opens it (all fail fast again).
    """

    def __init__(self, threshold: int, cooldown_s: float) -> None:
        self.threshold, self.cooldown_s = threshold, cooldown_s
        self.consecutive = 0
        self.opened_at: float | None = None
        self.times_opened = 0
        self._probe_done: asyncio.Event | None = None  # set while a probe is in flight

    async def acquire(self) -> tuple[bool, bool]:
        """(allowed, is_probe) for the next attempt."""
        while True:
            if self.opened_at is None:
                return True, False
            if time.monotonic() - self.opened_at < self.cooldown_s:
                return False, False
            if self._probe_done is None:
                self._probe_done = asyncio.Event()
                return True, True
            await self._probe_done.wait()

    def record(self, ok: bool, probe: bool = False) -> None:
        if probe and self._probe_done is not None:
            self._probe_done.set()
            self._probe_done = None
        if ok:
            if self.opened_at is not None:
                logger.info("TRM server reachable again; circuit breaker closed")
            self.consecutive, self.opened_at = 0, None
            return
        self.consecutive += 1
        if probe or (self.opened_at is None and self.consecutive >= self.threshold):
            if self.opened_at is None:
                self.times_opened += 1
                logger.warning("TRM server failing (%d consecutive errors); circuit breaker "
                               "open for %.1f s", self.consecutive, self.cooldown_s)
            self.opened_at = time.monotonic()


class VllmServerThinkingClient(ThinkingRewardClient):
    """TRM behind an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Requests run on a private asyncio loop in a daemon thread (one aiohttp session,
    pooled connections), so ``score()`` is callable from synchronous training code.
    """

    def __init__(self, cfg: ThinkingRewardConfig) -> None:
        self.cfg = cfg
        self._url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._breaker = _CircuitBreaker(cfg.breaker_threshold, cfg.breaker_cooldown_s)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trm-client",
                                        daemon=True)
        self._thread.start()
        self._session = None
        self.completed_requests = 0  # finished (scored or failed) since construction

    # -- public

    def score(self, requests: Sequence[ThinkingRequest]) -> ThinkingScores:
        fut = asyncio.run_coroutine_threadsafe(self._ascore(requests), self._loop)
        return fut.result()

    async def _ascore(self, requests: Sequence[ThinkingRequest]) -> ThinkingScores:
        # Runs on the client's own loop: the aiohttp session belongs to it.
        t0 = time.monotonic()
        n = len(requests)
        scores = np.full(n, np.nan, dtype=np.float32)
        failures: Counter[str] = Counter()
        if n == 0:
            return ThinkingScores(scores, {}, 0.0)
        deadline = None if self.cfg.batch_deadline_s is None else t0 + self.cfg.batch_deadline_s
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        session = await self._get_session()

        async def one(i: int) -> None:
            try:
                scores[i] = await self._score_one(session, sem, requests[i], deadline)
            except _Failure as f:
                failures[f.reason] += 1
                logger.debug("TRM request %d failed: %s", i, f)
            except Exception as err:  # a bug or an unexpected library error: still no raise
                failures["internal"] += 1
                logger.warning("TRM request %d: unexpected %r", i, err)
            self.completed_requests += 1

        await asyncio.gather(*(one(i) for i in range(n)))
        if failures:
            logger.warning("TRM scoring: %d/%d missing (%s)", int(np.isnan(scores).sum()), n,
                           ", ".join(f"{k}={v}" for k, v in sorted(failures.items())))
        return ThinkingScores(scores, dict(failures), time.monotonic() - t0)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._session is not None:
            asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result(timeout=10)
            self._session = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    # -- internals

    async def _get_session(self):
        import aiohttp

        if self._session is None or self._session.closed:
            ssl_ctx: Any = None
            if self.cfg.base_url.startswith("https://"):
                import ssl

                ssl_ctx = (ssl.create_default_context(cafile=self.cfg.ca_bundle)
                           if self.cfg.verify_tls else False)
            connector = aiohttp.TCPConnector(limit=self.cfg.max_concurrency, ssl=ssl_ctx)
            headers = {"Content-Type": "application/json"}
            if self.cfg.api_key:
                headers["Authorization"] = f"Bearer {self.cfg.api_key}"
            self._session = aiohttp.ClientSession(connector=connector, headers=headers)
        return self._session

    def _body(self, req: ThinkingRequest) -> dict[str, Any]:
        try:
            parts = [{"type": "image_url",
                      "image_url": {"url": _image_to_data_url(im, self.cfg.image_format)}}
                     for im in req.images]
        except (TypeError, OSError, ValueError) as err:
            raise _Failure("bad_request", retryable=False, detail=str(err)) from err
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": build_messages(req, self.cfg, image_parts=parts),
            "max_tokens": self.cfg.max_tokens,
            "temperature": 0.0,
        }
        if self.cfg.score_mode == "expected":
            body["logprobs"] = True
            body["top_logprobs"] = self.cfg.top_logprobs
        if self.cfg.constrained:
            body["structured_outputs"] = {"regex": SCORE_REGEX}
        return body

    async def _score_one(self, session, sem: asyncio.Semaphore, req: ThinkingRequest,
                         deadline: float | None) -> float:
        body = self._body(req)
        last: _Failure | None = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                await asyncio.sleep(min(self.cfg.backoff_max_s,
                                        self.cfg.backoff_base_s * 2 ** (attempt - 1))
                                    * random.uniform(0.5, 1.0))
            async with sem:
                if deadline is not None and time.monotonic() >= deadline:
                    raise _Failure("deadline", retryable=False)
                allowed, probe = await self._breaker.acquire()
                if not allowed:
                    # A request that already met the real error reports that reason.
                    if last is not None:
                        raise last
                    raise _Failure("circuit_open", retryable=False)
                try:
                    value = await self._post(session, body, deadline)
                except _Failure as f:
                    # Only transport-level trouble says the server is unhealthy.
                    self._breaker.record(ok=not f.retryable, probe=probe)
                    if not f.retryable:
                        raise
                    last = f
                    continue
                except BaseException:
                    self._breaker.record(ok=False, probe=probe)  # never leave a probe hanging
                    raise
                self._breaker.record(ok=True, probe=probe)
                return value
        assert last is not None
        raise last

    async def _post(self, session, body: dict[str, Any], deadline: float | None) -> float:
        import aiohttp

        total = self.cfg.request_timeout_s
        if deadline is not None:
            total = max(0.05, min(total, deadline - time.monotonic()))
        timeout = aiohttp.ClientTimeout(total=total, sock_connect=self.cfg.connect_timeout_s)
        try:
            async with session.post(self._url, json=body, timeout=timeout) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:200]
                    retryable = resp.status in (408, 429) or resp.status >= 500
                    raise _Failure(f"http_{resp.status}", retryable=retryable, detail=detail)
                data = await resp.json(content_type=None)
        except _Failure:
            raise
        except TimeoutError as err:  # aiohttp's timeouts subclass it
            raise _Failure("timeout", retryable=True, detail=repr(err)) from err
        except (aiohttp.ClientConnectionError, ConnectionError, OSError) as err:
            raise _Failure("connection", retryable=True, detail=repr(err)) from err
        except (aiohttp.ClientPayloadError, aiohttp.ContentTypeError, ValueError) as err:
            raise _Failure("malformed", retryable=True, detail=repr(err)) from err
        except aiohttp.ClientError as err:
            raise _Failure("client_error", retryable=True, detail=repr(err)) from err
        return self._parse_reply(data)

    def _parse_reply(self, data: Any) -> float:
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as err:
            raise _Failure("malformed", retryable=False, detail=f"reply {str(data)[:120]}") from err
        toks = None
        if self.cfg.score_mode == "expected":
            content = ((choice.get("logprobs") or {}).get("content")) or []
            toks = [(t["token"], float(t["logprob"]),
                     [(a["token"], float(a["logprob"])) for a in t.get("top_logprobs") or []])
                    for t in content]
        return _score_from_reply(text, toks, self.cfg.score_mode)


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


def make_thinking_client(cfg: ThinkingRewardConfig, engine: Any = None) -> ThinkingRewardClient:
    """The configured backend; ``engine`` (a RolloutEngine) is needed for ``in_process``."""
    if cfg.backend == "http":
        return VllmServerThinkingClient(cfg)
    if engine is None:
        raise ValueError("rewards.thinking.backend='in_process' needs a rollout engine")
    return InProcessThinkingClient(engine, cfg)
