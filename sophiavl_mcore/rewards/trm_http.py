"""The TRM client's HTTP backend: an OpenAI-compatible ``/v1/chat/completions`` endpoint
(``vllm serve``), called from synchronous training code.

What a hostile or broken server can do to it, and what it does about it:

- a huge reply: the body is read in chunks and abandoned past
  ``ThinkingRewardConfig.max_reply_bytes`` (or at once, when ``Content-Length`` says so)
  — failure ``too_large``, memory bounded by the cap;
- 429 / 503 with ``Retry-After`` (seconds or an HTTP date): the next attempt waits at
  least that long (capped at ``retry_after_max_s``; a wait past the batch deadline ends
  the request with the HTTP failure instead);
- a connection cut in the middle of the body: failure ``connection`` (retried), not
  ``malformed`` (a complete body that is not the expected JSON);
- a reply that is not ``<answer>s</answer>`` or a bare score: failure ``parse``
  (:func:`~sophiavl_mcore.rewards.thinking.parse_score`).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import email.utils
import io
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from sophiavl_mcore.rewards.config import ThinkingRewardConfig
from sophiavl_mcore.rewards.thinking import (
    SCORE_REGEX,
    ThinkingRequest,
    ThinkingRewardClient,
    ThinkingScores,
    _Failure,
    _score_from_reply,
    build_messages,
)

logger = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_ERROR_BODY_BYTES = 200
IDLE_CONNECTION_S = 2.0  # below uvicorn's keep-alive (5 s); see _get_session()


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



def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date);
    None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


async def read_capped(resp: Any, cap: int) -> bytes:
    """The body of an aiohttp response, or ``_Failure('too_large')`` as soon as it is
    known to exceed ``cap`` bytes (from ``Content-Length`` or while reading)."""
    if resp.content_length is not None and resp.content_length > cap:
        raise _Failure("too_large", retryable=False,
                       detail=f"Content-Length {resp.content_length} > max_reply_bytes {cap}")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > cap:
            raise _Failure("too_large", retryable=False,
                           detail=f"reply longer than max_reply_bytes {cap}")
    return bytes(body)


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
    """TRM behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (see the module
    docstring for how it treats a misbehaving server).

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
        first: list[str] = []  # the first failure's detail, for the warning

        async def one(i: int) -> None:
            try:
                scores[i] = await self._score_one(session, sem, requests[i], deadline)
            except _Failure as f:
                failures[f.reason] += 1
                if not first:
                    first.append(f"{f.reason}: {f.detail}"[:200])
                logger.debug("TRM request %d failed: %s", i, f)
            except Exception as err:  # a bug or an unexpected library error: still no raise
                failures["internal"] += 1
                logger.warning("TRM request %d: unexpected %r", i, err)
            self.completed_requests += 1

        await asyncio.gather(*(one(i) for i in range(n)))
        if failures:
            logger.warning("TRM scoring: %d/%d missing (%s); first: %s",
                           int(np.isnan(scores).sum()), n,
                           ", ".join(f"{k}={v}" for k, v in sorted(failures.items())),
                           first[0] if first else "-")
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
            # Idle pooled connections are dropped by the client after IDLE_CONNECTION_S, before
            # vLLM's server (uvicorn, keep-alive 5 s) closes them: in the main job, with a
            # training step (> 5 s) between two batches, reused connections the server had
            # closed failed as ServerDisconnectedError in bursts of dozens, which opened
            # the breaker and lost half a batch of scores.
            connector = aiohttp.TCPConnector(limit=self.cfg.max_concurrency, ssl=ssl_ctx,
                                             keepalive_timeout=IDLE_CONNECTION_S)
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

    def _wait_before(self, attempt: int, last: _Failure | None) -> float:
        """Seconds to wait before retry ``attempt`` (>= 1): jittered exponential backoff,
        or the server's Retry-After when longer (capped)."""
        backoff = (min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
                   * random.uniform(0.5, 1.0))
        if last is not None and last.retry_after_s is not None:
            return max(backoff, min(last.retry_after_s, self.cfg.retry_after_max_s))
        return backoff

    async def _score_one(self, session, sem: asyncio.Semaphore, req: ThinkingRequest,
                         deadline: float | None) -> float:
        body = self._body(req)
        last: _Failure | None = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                wait = self._wait_before(attempt, last)
                if deadline is not None and time.monotonic() + wait >= deadline:
                    assert last is not None
                    raise last  # the server's own answer, not a later "deadline"
                await asyncio.sleep(wait)
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
                    detail = (await resp.content.read(_ERROR_BODY_BYTES)).decode(errors="replace")
                    retryable = resp.status in (408, 429) or resp.status >= 500
                    wait = (retry_after_seconds(resp.headers.get("Retry-After"))
                            if resp.status in (429, 503) else None)
                    raise _Failure(f"http_{resp.status}", retryable=retryable, detail=detail,
                                   retry_after_s=wait)
                raw = await read_capped(resp, self.cfg.max_reply_bytes)
        except _Failure:
            raise
        except TimeoutError as err:  # aiohttp's timeouts subclass it
            raise _Failure("timeout", retryable=True, detail=repr(err)) from err
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError,
                OSError) as err:
            # ClientPayloadError: the connection ended before the body did.
            raise _Failure("connection", retryable=True, detail=repr(err)) from err
        except aiohttp.ClientError as err:
            raise _Failure("client_error", retryable=True, detail=repr(err)) from err
        try:
            data = json.loads(raw)
        except ValueError as err:  # a complete body that is not JSON (UnicodeError too)
            raise _Failure("malformed", retryable=True, detail=f"{err}: {raw[:80]!r}") from err
        return self._parse_reply(data)

    def _parse_reply(self, data: Any) -> float:
        """The score in a chat-completion JSON reply; ``malformed`` when the JSON lacks the
        fields, ``parse`` when the text holds no score."""
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] or ""
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
            toks = None
            if self.cfg.score_mode == "expected":
                content = ((choice.get("logprobs") or {}).get("content")) or []
                toks = [(t["token"], float(t["logprob"]),
                         [(a["token"], float(a["logprob"])) for a in t.get("top_logprobs") or []])
                        for t in content]
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as err:
            raise _Failure("malformed", retryable=False, detail=f"reply {str(data)[:120]}") from err
        return _score_from_reply(text, toks, self.cfg.score_mode)
