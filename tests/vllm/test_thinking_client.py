"""TRM client: prompt, parsing, expected score, and the failure policy against real
HTTP servers on localhost (a misbehaving aiohttp server stands in for failure modes a
healthy vLLM never produces: garbage bodies, 500s, slowness)."""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
import tracemalloc

import numpy as np
import pytest

from sophiavl_mcore.rewards.config import DEFAULT_TEMPLATE, ThinkingRewardConfig
from sophiavl_mcore.rewards.thinking import (
    INSTRUCTION,
    ThinkingRequest,
    ThinkingScores,
    build_messages,
    expected_score,
    parse_score,
)
from sophiavl_mcore.rewards.trm_http import VllmServerThinkingClient, retry_after_seconds


@pytest.mark.parametrize("text, expected", [
    ("<answer>0.7</answer>", 0.7),
    ("<answer> 1.0 </answer>", 1.0),
    ("<think>ok</think><answer>0</answer>", 0.0),
    ("<ANSWER>0.25</ANSWER> because it is sound", 0.25),
    ("0.7", 0.7),  # a bare score
    (" 1 ", 1.0),
    (".5", 0.5),
    # Issue 17: numbers outside the two forms are never read (the old last-number
    # fallback scored the first two 1.0 and the next 0.4 / 0.3).
    ("0.7 out of 1", None),
    ("Score 0.9 on a 0 to 1 scale", None),
    ("score: 0.4", None),
    ("<answer>0.3", None),
    ("<answer>0.7</answer><answer>0.2</answer>", None),
    ("<answer>7</answer>", None),
    ("<answer>1.5</answer>", None),
    ("<answer>-0.1</answer>", None),
    ("no score here", None),
    ("", None),
])
def test_parse_score(text, expected):
    got = parse_score(text)
    assert (got is None) if expected is None else got == pytest.approx(expected)


def test_expected_score_weights_choices_by_probability():
    ln = math.log
    tokens = [
        ("<answer>", 0.0, []),
        ("0", ln(0.6), [("0", ln(0.6)), ("1", ln(0.4))]),  # "1" can only be 1.0
        (".", 0.0, []),
        ("3", ln(0.5), [("3", ln(0.5)), ("4", ln(0.3)), ("5", ln(0.2))]),
        ("</answer>", 0.0, [("<", -math.inf)]),
    ]
    # 0.4 * 1.0 + 0.6 * (0.5 * 0.3 + 0.3 * 0.4 + 0.2 * 0.5) = 0.622
    assert expected_score(tokens) == pytest.approx(0.622, abs=1e-6)
    # A top-k that misses some mass is renormalised over what was seen.
    tokens[1] = ("0", ln(0.5), [("1", ln(0.25))])
    assert expected_score(tokens) == pytest.approx((0.25 * 1.0 + 0.5 * 0.37) / 0.75, abs=1e-6)
    assert expected_score([("hello", 0.0, [])]) is None


def test_prompt_has_question_reasoning_criteria_and_image_slot():
    cfg = ThinkingRewardConfig(max_reasoning_chars=50)
    req = ThinkingRequest(question="How many apples?", reasoning="x" * 80 + "so 3 apples",
                          images=["img"])
    msgs = build_messages(req, cfg)
    user = msgs[-1]["content"]
    assert user[0] == {"type": "image"}
    text = user[-1]["text"]
    for needle in ("How many apples?", "so 3 apples", "Logical soundness", "Correct reasoning",
                   "Error identification", "Language consistency", "Redundancy",
                   "<answer>score</answer>"):
        assert needle in text
    assert "x" * 60 not in text  # reasoning truncated to its last 50 chars


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError) as err:
        ThinkingRewardConfig(base_url="ftp://x", max_concurrency=0, backoff_base_s=2.0,
                             backoff_max_s=1.0)
    msg = str(err.value)
    assert "ftp://x" in msg and "max_concurrency=0" in msg and "backoff_max_s=1.0" in msg


def test_prompt_template_file(tmp_path):
    """Issue 13 item 5: the user prompt comes from a template file, read once; braces
    other than the two placeholders are kept."""
    assert DEFAULT_TEMPLATE.is_file() and INSTRUCTION in DEFAULT_TEMPLATE.read_text()
    tpl = tmp_path / "released.txt"
    tpl.write_text('Q: {question}\nR: {reasoning}\nReply as {"score": x} or <answer>x</answer>\n')
    cfg = ThinkingRewardConfig(prompt_template=str(tpl), system_prompt="")
    msgs = build_messages(ThinkingRequest(question=" How many? ", reasoning="two and two"), cfg)
    assert len(msgs) == 1 and msgs[0]["role"] == "user"  # no system message
    assert msgs[0]["content"][-1]["text"] == (
        'Q: How many?\nR: two and two\nReply as {"score": x} or <answer>x</answer>')
    tpl.write_text("changed {question} {reasoning}")  # read once: later edits are not seen
    again = build_messages(ThinkingRequest(question="q", reasoning="r"), cfg)
    assert again[0]["content"][-1]["text"].startswith("Q: q\nR: r")


def test_prompt_template_errors_are_one_line_at_config_time(tmp_path):
    from sophiavl_mcore.config import ConfigError, load_config
    from sophiavl_mcore.rewards.config import RewardsConfig

    bad = tmp_path / "no_reasoning.txt"
    bad.write_text("Question: {question}\n")
    with pytest.raises(ValueError) as err:
        ThinkingRewardConfig(prompt_template=str(bad))
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and "{reasoning}" in msg, msg
    missing = tmp_path / "absent.txt"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"thinking.prompt_template={missing}"], cls=RewardsConfig)
    msg = str(err.value)
    assert "\n" not in msg and str(missing) in msg and "cannot be read" in msg, msg


def test_retry_after_header_forms():
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_metrics_names():
    s = ThinkingScores(np.array([0.5, np.nan], dtype=np.float32), {"timeout": 1}, 1.5)
    m = s.metrics()
    assert m["reward/trm_fail_timeout"] == 1.0 and m["reward/trm_missing_frac"] == 0.5


# --------------------------------------------------------------- misbehaving server


HUGE_BYTES = 20 * 2**20


class _BadServer:
    """aiohttp server in a thread; the path prefix picks the misbehaviour."""

    def __init__(self) -> None:
        from aiohttp import web

        self.attempts: dict[str, list[float]] = {}  # prompt text -> arrival times

        async def handler(request: web.Request) -> web.StreamResponse:
            mode = request.match_info["mode"]
            prompt = (await request.json())["messages"][-1]["content"][-1]["text"]
            self.attempts.setdefault(f"{mode}:{prompt}", []).append(time.monotonic())
            if mode == "garbage":
                return web.Response(text="<html>not json", content_type="text/html")
            if mode == "err500":
                return web.Response(status=500, text="boom")
            if mode == "err400":
                return web.Response(status=400, text="prompt too long")
            if mode == "slow":
                await asyncio.sleep(5)
            if mode == "noscore":
                body = {"choices": [{"message": {"content": "I like this reasoning."}}]}
                return web.json_response(body)
            if mode == "nochoices":
                return web.json_response({"object": "error"})
            if mode in ("huge", "huge_len"):
                return await _stream_numbers(request, mode == "huge_len")
            if mode == "cut":
                return await _cut_mid_body(request)
            if mode.startswith("retry_after") and len(self.attempts[f"{mode}:{prompt}"]) == 1:
                return web.Response(status=429, text="slow down",
                                    headers={"Retry-After": mode.split("_")[-1]})
            return web.json_response({"choices": [{"message": {"content": "<answer>0.6</answer>"}}]})

        async def _stream_numbers(request: web.Request, with_length: bool) -> web.StreamResponse:
            """A valid chat reply whose content is 20 MB of numbers, sent in 64 KiB chunks."""
            head, tail = b'{"choices": [{"message": {"content": "', b'"}}]}'
            chunk = b"0.1 " * 16384
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            if with_length:
                resp.content_length = len(head) + HUGE_BYTES + len(tail)
            await resp.prepare(request)
            try:
                await resp.write(head)
                for _ in range(HUGE_BYTES // len(chunk)):
                    await resp.write(chunk)
                await resp.write(tail)
            except (ConnectionError, RuntimeError):
                pass  # the client stopped reading: what a capped client does
            return resp

        async def _cut_mid_body(request: web.Request) -> web.StreamResponse:
            """Headers promise 1000 bytes; 30 arrive, then the connection closes."""
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 1000
            await resp.prepare(request)
            await resp.write(b'{"choices": [{"message": {"co')
            request.transport.close()
            return resp

        self.loop = asyncio.new_event_loop()
        app = web.Application(client_max_size=2**24)
        app.router.add_post("/{mode}/v1/chat/completions", handler)
        self.runner = web.AppRunner(app)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

        async def start() -> None:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        self.loop.run_until_complete(start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/v1"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def bad_server():
    srv = _BadServer()
    yield srv
    srv.close()


def _reqs(n: int) -> list[ThinkingRequest]:
    return [ThinkingRequest(question=f"q{i}", reasoning=f"r{i}") for i in range(n)]


@pytest.mark.parametrize("mode, reason, tries", [
    ("garbage", "malformed", 2),
    ("err500", "http_500", 2),
    ("err400", "http_400", 1),
    ("slow", "timeout", 2),
    ("noscore", "parse", 1),
    ("nochoices", "malformed", 1),
    ("cut", "connection", 2),  # issue 17: was counted as malformed
])
def test_failure_reasons_are_counted_never_raised(bad_server, mode, reason, tries):
    cfg = ThinkingRewardConfig(base_url=bad_server.url(mode), request_timeout_s=0.3,
                               max_retries=1, backoff_base_s=0.01, backoff_max_s=0.02,
                               breaker_threshold=100)
    with VllmServerThinkingClient(cfg) as client:
        out = client.score(_reqs(6))
    assert np.isnan(out.scores).all()
    assert out.failures == {reason: 6}, out.failures
    assert out.metrics()[f"reward/trm_fail_{reason}"] == 6.0


def test_healthy_fake_reply_and_api_key_header(bad_server):
    cfg = ThinkingRewardConfig(base_url=bad_server.url("ok"), api_key="k")
    with VllmServerThinkingClient(cfg) as client:
        out = client.score(_reqs(5) + [ThinkingRequest("q", "r", images=[object()])])
    np.testing.assert_allclose(out.scores[:5], 0.6, rtol=1e-6)
    assert math.isnan(out.scores[5]) and out.failures == {"bad_request": 1}


def test_dead_server_fails_fast_through_circuit_breaker():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ThinkingRewardConfig(base_url=f"http://127.0.0.1:{port}/v1", max_retries=5,
                               backoff_base_s=0.05, backoff_max_s=0.1, breaker_threshold=4,
                               breaker_cooldown_s=60, max_concurrency=8)
    with VllmServerThinkingClient(cfg) as client:
        out = client.score(_reqs(500))
        assert client._breaker.times_opened == 1
    assert np.isnan(out.scores).all()
    assert sum(out.failures.values()) == 500
    assert set(out.failures) <= {"connection", "circuit_open"}
    # Only the requests in flight when the breaker opened met the real error.
    assert out.failures["circuit_open"] >= 500 - 8 - 4



@pytest.mark.parametrize("mode", ["huge", "huge_len"])
def test_huge_reply_is_capped_while_reading(bad_server, mode):
    """Issue 17: a 20 MB reply made of numbers used to be read whole and every number
    listed (+480 MB, the last number scored). Now reading stops at max_reply_bytes
    (at once when Content-Length says so) and the request fails as too_large."""
    cfg = ThinkingRewardConfig(base_url=bad_server.url(mode), max_retries=0,
                               max_reply_bytes=2**20, request_timeout_s=30)
    with VllmServerThinkingClient(cfg) as client:
        tracemalloc.start()
        try:
            out = client.score(_reqs(2))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert np.isnan(out.scores).all() and out.failures == {"too_large": 2}, out.failures
    assert peak < 16 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB for a 1 MiB cap"


def test_retry_after_is_honoured(bad_server):
    """Issue 17: a 429 with Retry-After: 1 used to be retried after the ~10 ms backoff."""
    cfg = ThinkingRewardConfig(base_url=bad_server.url("retry_after_1"), max_retries=2,
                               backoff_base_s=0.01, backoff_max_s=0.02, breaker_threshold=100)
    with VllmServerThinkingClient(cfg) as client:
        out = client.score(_reqs(3))
    np.testing.assert_allclose(out.scores, 0.6, rtol=1e-6)
    times = [t for key, t in bad_server.attempts.items() if key.startswith("retry_after_1:")]
    assert len(times) == 3 and all(len(t) == 2 for t in times), times
    gaps = [t[1] - t[0] for t in times]
    assert min(gaps) >= 0.95, gaps


def test_retry_after_past_the_deadline_ends_the_request(bad_server):
    cfg = ThinkingRewardConfig(base_url=bad_server.url("retry_after_30"), max_retries=2,
                               backoff_base_s=0.01, backoff_max_s=0.02, batch_deadline_s=2.0)
    t0 = time.monotonic()
    with VllmServerThinkingClient(cfg) as client:
        out = client.score(_reqs(2))
    assert out.failures == {"http_429": 2} and time.monotonic() - t0 < 1.5
