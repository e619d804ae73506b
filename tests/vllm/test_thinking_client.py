"""TRM client: prompt, parsing, expected score, and the failure policy against real
HTTP servers on localhost (a misbehaving aiohttp server stands in for failure modes a
healthy vLLM never produces: garbage bodies, 500s, slowness)."""

from __future__ import annotations

import asyncio
import math
import socket
import threading

import numpy as np
import pytest

from sophiavl_mcore.rewards.thinking import (
    ThinkingRequest,
    ThinkingRewardConfig,
    ThinkingScores,
    VllmServerThinkingClient,
    build_messages,
    expected_score,
    parse_score,
)


@pytest.mark.parametrize("text, expected", [
    ("<answer>0.7</answer>", 0.7),
    ("<answer> 1.0 </answer>", 1.0),
    ("<think>ok</think><answer>0</answer>", 0.0),
    ("<answer>0.3", 0.3),
    ("score: 0.4", 0.4),
    ("<answer>7</answer>", None),
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


def test_metrics_names():
    s = ThinkingScores(np.array([0.5, np.nan], dtype=np.float32), {"timeout": 1}, 1.5)
    m = s.metrics()
    assert m["reward/trm_fail_timeout"] == 1.0 and m["reward/trm_missing_frac"] == 0.5


# --------------------------------------------------------------- misbehaving server


class _BadServer:
    """aiohttp server in a thread; the path prefix picks the misbehaviour."""

    def __init__(self) -> None:
        from aiohttp import web

        async def handler(request: web.Request) -> web.Response:
            mode = request.match_info["mode"]
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
            return web.json_response({"choices": [{"message": {"content": "<answer>0.6</answer>"}}]})

        self.loop = asyncio.new_event_loop()
        app = web.Application()
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

