"""TRM scoring against a real ``vllm serve`` on localhost (tiny random Qwen2.5-VL)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from sophiavl_mcore.rewards.config import ThinkingRewardConfig
from sophiavl_mcore.rewards.thinking import SCORE_CHOICES, InProcessThinkingClient, ThinkingRequest
from sophiavl_mcore.rewards.trm_http import VllmServerThinkingClient
from sophiavl_mcore.testing.tiny_models import make_test_image

CHOICE_VALUES = np.array([float(c) for c in SCORE_CHOICES], dtype=np.float32)


def _requests(n: int, with_images: bool = True) -> list[ThinkingRequest]:
    return [ThinkingRequest(question=f"What is {i} + {i}? Look at the picture.",
                            reasoning=f"<think>{i} + {i} = {2 * i}, so the answer is {2 * i}."
                                      f"</think><answer>{2 * i}</answer>",
                            images=[make_test_image(i % 7)] if with_images else [])
            for i in range(n)]


def _cfg(server, **kw) -> ThinkingRewardConfig:
    return ThinkingRewardConfig(base_url=server.base_url, api_key=server.api_key, model="trm", **kw)


def test_64_responses_scored_concurrently(healthy_server, engine):
    reqs = _requests(64)
    # One reasoning far longer than the server's context: only it may fail (HTTP 400).
    too_long = ThinkingRequest("q", " ".join(f"w{i}" for i in range(3000)))
    with VllmServerThinkingClient(_cfg(healthy_server, max_concurrency=64)) as client:
        greedy = client.score(reqs + [too_long])
    assert greedy.failures == {"http_400": 1}, greedy.failures
    assert np.isnan(greedy.scores[64])
    got = greedy.scores[:64]
    # constrained decoding: every reply parses, and only the 11 grid values occur
    assert np.isfinite(got).all()
    assert np.isin(np.round(got, 1), CHOICE_VALUES).all()

    with VllmServerThinkingClient(_cfg(healthy_server, score_mode="expected")) as client:
        expected = client.score(reqs[:16])
    assert expected.failures == {}
    assert np.isfinite(expected.scores).all()
    assert ((expected.scores >= 0) & (expected.scores <= 1)).all()
    # a probability-weighted mean of a random model is not a grid point
    assert not np.isin(np.round(expected.scores, 4), CHOICE_VALUES).all()

    # The in-process backend on the same checkpoint gives the same greedy scores.
    local = InProcessThinkingClient(engine, _cfg(healthy_server)).score(reqs[:16] + [too_long])
    assert local.failures == {"too_long": 1}, local.failures
    np.testing.assert_allclose(local.scores[:16], got[:16], atol=1e-6)
    local_exp = InProcessThinkingClient(engine, _cfg(healthy_server, score_mode="expected"))
    local_expected = local_exp.score(reqs[:4])
    assert local_expected.failures == {}
    np.testing.assert_allclose(local_expected.scores, expected.scores[:4], atol=2e-3)


def test_batches_a_training_step_apart_all_score(healthy_server):
    """One client, two batches 6 s apart (as between two training steps, longer than the
    server's keep-alive): every request of both scores, the same way."""
    reqs = _requests(24)
    with VllmServerThinkingClient(_cfg(healthy_server, max_concurrency=24)) as client:
        first = client.score(reqs)
        time.sleep(6.0)
        second = client.score(reqs)
    assert first.failures == {} and second.failures == {}, (first.failures, second.failures)
    np.testing.assert_allclose(second.scores, first.scores)


@pytest.mark.slow
def test_server_killed_mid_batch_then_restarted(healthy_server):
    cfg = _cfg(healthy_server, max_concurrency=4, request_timeout_s=10.0, max_retries=2,
               backoff_base_s=0.2, backoff_max_s=0.5, breaker_threshold=4,
               breaker_cooldown_s=1.0)
    reqs = _requests(256, with_images=False)
    with VllmServerThinkingClient(cfg) as client:
        box = {}
        worker = threading.Thread(target=lambda: box.setdefault("out", client.score(reqs)))
        worker.start()
        while client.completed_requests < 16 and worker.is_alive():
            time.sleep(0.05)
        done_before_kill = client.completed_requests
        healthy_server.kill()
        worker.join(timeout=120)
        assert not worker.is_alive(), "score() did not return after the server died"
        out = box["out"]
        assert 16 <= done_before_kill < 256
        scored = np.isfinite(out.scores)
        assert scored.sum() >= 16 and (~scored).sum() > 0
        assert sum(out.failures.values()) == int((~scored).sum())
        assert set(out.failures) <= {"connection", "circuit_open", "timeout"}, out.failures
        assert client._breaker.times_opened >= 1

        healthy_server.start()
        healthy_server.wait_healthy(timeout_s=400)
        time.sleep(cfg.breaker_cooldown_s)
        again = client.score(reqs[:16])
        assert again.failures == {}, again.failures
        assert np.isfinite(again.scores).all()
