"""TRM scoring throughput: our concurrent client vs one request at a time.

Both score the same kind of request (question + image + reasoning, constrained
decoding) against the same local ``vllm serve`` in the same run. The baseline sends
one request at a time with the synchronous OpenAI client, as the reference
implementation does; ours is :class:`VllmServerThinkingClient` (bounded concurrency,
so vLLM batches the requests).

    .venv/bin/python bench/bench_trm.py                # tiny random Qwen2.5-VL on CPU
    .venv/bin/python bench/bench_trm.py --base-url http://host:8000/v1 --model trm

Last line: ``RESULT trm speedup=<x> baseline=sequential-http target=5 status=<ok|short>``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 5.0


def make_requests(n: int, with_images: bool):
    from sophiavl_mcore.rewards.thinking import ThinkingRequest
    from sophiavl_mcore.testing.tiny_models import make_test_image

    return [ThinkingRequest(
        question=f"Find the value of x if {i} + x = {2 * i + 3}. Use the diagram.",
        reasoning=(f"<think>We subtract {i} from both sides: x = {2 * i + 3} - {i} = {i + 3}. "
                   f"Check: {i} + {i + 3} = {2 * i + 3}.</think><answer>{i + 3}</answer>"),
        images=[make_test_image(i % 13)] if with_images else [],
    ) for i in range(n)]


def sequential_baseline(base_url: str, api_key: str, model: str, cfg, requests) -> tuple[float, int]:
    """One blocking request at a time; returns (seconds, number scored)."""
    from openai import OpenAI

    from sophiavl_mcore.rewards.thinking import (
        SCORE_REGEX,
        build_messages,
        parse_score,
    )
    from sophiavl_mcore.rewards.trm_http import _image_to_data_url

    client = OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=120)
    ok = 0
    t0 = time.perf_counter()
    for req in requests:
        parts = [{"type": "image_url", "image_url": {"url": _image_to_data_url(im, "PNG")}}
                 for im in req.images]
        reply = client.chat.completions.create(
            model=model, messages=build_messages(req, cfg, image_parts=parts),
            max_tokens=cfg.max_tokens, temperature=0.0,
            extra_body={"structured_outputs": {"regex": SCORE_REGEX}},
        )
        ok += parse_score(reply.choices[0].message.content or "") is not None
    return time.perf_counter() - t0, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default=None, help="use a running server instead of starting one")
    ap.add_argument("--api-key", default="bench-key")
    ap.add_argument("--model", default="trm", help="served model name")
    ap.add_argument("--model-dir", default=None, help="checkpoint to serve (default: tiny random)")
    ap.add_argument("--n-ours", type=int, default=256)
    ap.add_argument("--n-baseline", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds of baseline and ours; medians are reported")
    ap.add_argument("--no-images", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from sophiavl_mcore.rewards.config import ThinkingRewardConfig
    from sophiavl_mcore.rewards.trm_http import VllmServerThinkingClient
    from sophiavl_mcore.rollout.server import VllmServer

    server = None
    tmp = tempfile.TemporaryDirectory(prefix="bench_trm_")
    base_url = args.base_url
    if base_url is None:
        model_dir = args.model_dir
        if model_dir is None:
            from sophiavl_mcore.testing.tiny_models import build_tiny_qwen2_5_vl

            model_dir = build_tiny_qwen2_5_vl(Path(tmp.name) / "tiny_vl")
        server = VllmServer(model_dir, Path(tmp.name) / "server.log", api_key=args.api_key,
                            served_name=args.model, max_num_seqs=args.concurrency).start()
        startup = server.wait_healthy(timeout_s=600)
        print(f"vllm serve healthy after {startup:.1f} s (port {server.port})")
        base_url = server.base_url
    rows_base, rows_ours, failures = [], [], {}
    try:
        with_images = not args.no_images
        cfg = ThinkingRewardConfig(base_url=base_url, api_key=args.api_key, model=args.model,
                                   max_concurrency=args.concurrency, request_timeout_s=300,
                                   batch_deadline_s=None)
        with VllmServerThinkingClient(cfg) as client:
            # warm-up: first requests pay for lazy initialisation in the server
            client.score(make_requests(8, with_images))
            # Interleaved rounds so both sides see the same background load.
            for _ in range(args.rounds):
                t, ok = sequential_baseline(base_url, args.api_key, args.model, cfg,
                                            make_requests(args.n_baseline, with_images))
                rows_base.append((t, ok))
                t0 = time.perf_counter()
                ours = client.score(make_requests(args.n_ours, with_images))
                rows_ours.append((time.perf_counter() - t0, int(np.isfinite(ours.scores).sum())))
                for k, v in ours.failures.items():
                    failures[k] = failures.get(k, 0) + v
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()

    rate_base = float(np.median([args.n_baseline / t for t, _ in rows_base]))
    rate_ours = float(np.median([args.n_ours / t for t, _ in rows_ours]))
    speedup = rate_ours / rate_base
    print(f"{'client':<34}{'round':>6}{'requests':>10}{'scored':>8}{'seconds':>10}"
          f"{'responses/s':>13}")
    for r, ((tb, okb), (to, oko)) in enumerate(zip(rows_base, rows_ours, strict=True)):
        print(f"{'sequential (1 at a time, openai)':<34}{r:>6}{args.n_baseline:>10}{okb:>8}"
              f"{tb:>10.2f}{args.n_baseline / tb:>13.2f}")
        print(f"{'ours (async, concurrency ' + str(args.concurrency) + ')':<34}{r:>6}"
              f"{args.n_ours:>10}{oko:>8}{to:>10.2f}{args.n_ours / to:>13.2f}")
    print(f"median responses/s: sequential {rate_base:.2f}, ours {rate_ours:.2f}")
    if failures:
        print(f"failures (ours): {failures}")
    all_scored = all(ok == args.n_ours for _, ok in rows_ours)
    status = "ok" if speedup >= TARGET and all_scored else "short"
    print(f"RESULT trm speedup={speedup:.2f} baseline=sequential-http target={TARGET:g} "
          f"status={status}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.exit(main())
