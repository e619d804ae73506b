"""SPMD weight sync: Megatron TP=2 × DP=2 → two vLLM engines of rollout TP=2, vs memcpy.

    torchrun --nproc-per-node 4 bench/bench_spmd_sync.py [--layers 8] [--hidden 512] [--repeats 5]

Every rank holds one rank of a vLLM engine (``external_launcher``; ranks 0-1 form
engine 0, ranks 2-3 engine 1) and one Megatron TP shard of a random-weight Qwen2 LM
(text only; ``bench_weight_sync``'s checkpoint writer: ``--layers`` × ``--hidden``,
default ~0.25 GB float32). ``MegatronWeightSync.sync()`` (every rank holds an engine) broadcasts inside each
data-parallel replica the pieces a rank lacks (its bytes received) and every rank
writes the full HF tensors into its engine shard (its bytes loaded; vLLM's loaders
keep their slice).

Baseline: on every rank at once, a memcpy of exactly the HF tensors that rank's
engine loads (taken from the sync's own stream) into preallocated, touched tensors.
``--repeats`` runs of each, interleaved (memcpy, stream, sync, memcpy, ...), every
run started behind a barrier; a run's time is its slowest rank's (a sync is done when
every engine is). "stream" is the sync's own transfers + merges without the engine
write (where the time goes). RESULT ``weight_sync_spmd``: best memcpy run / best sync
run (the pair median is printed too: this shared CPU's memory bandwidth swings within
seconds), plus the largest bytes received by one rank and the model's HF bytes.
The first sync (untimed) is followed by a correctness check: the same greedy
generate on every rank, whose tokens must agree across both engines (same weights
everywhere) and differ from those of the all-zero initial weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from bench_weight_sync import _write_checkpoint  # noqa: E402 (the script's own folder)

logger = logging.getLogger("bench_spmd_sync")
TP, RTP = 2, 2


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512,
                    help="model width (multiple of 512 here: KV heads must split 2 ways)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--engine-update", default="auto", choices=("auto", "inplace", "live", "reload"))
    return ap.parse_args()


def _setup(args: argparse.Namespace):
    """The trainer's build order (``trainer/build.py``): world + Megatron groups, rank 0's
    files, every rank's engine shard, the policy, the sync."""
    import torch
    import torch.distributed as dist

    from sophiavl_mcore.models import build_qwen2_lm
    from sophiavl_mcore.parallel import ParallelConfig, initialize_parallel
    from sophiavl_mcore.rollout import RolloutConfig, SamplingConfig
    from sophiavl_mcore.rollout.layout import check_engine_layout
    from sophiavl_mcore.rollout.spmd import build_spmd_engine
    from sophiavl_mcore.weight_sync import WeightSyncConfig
    from sophiavl_mcore.weight_sync.megatron_sync import MegatronWeightSync

    heads = args.hidden // 64
    world = int(os.environ["WORLD_SIZE"])
    layout = check_engine_layout(world, RTP, world // RTP, 1, num_heads=heads, num_kv_heads=heads // 4)
    info = initialize_parallel(ParallelConfig(tp=TP, pp=1), num_layers=args.layers, num_heads=heads,
                               num_query_groups=heads // 4)
    where = [tempfile.mkdtemp(prefix="bench_spmd_") if info.rank == 0 else None]
    if info.rank == 0:
        _write_checkpoint(Path(where[0]), args.layers, args.hidden)
    dist.broadcast_object_list(where, src=0)
    model_dir = Path(where[0])
    logger.info("%s", layout.describe())
    engine = build_spmd_engine(RolloutConfig(
        model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256,
        max_num_seqs=2, enable_prefix_caching=False,
        sampling=SamplingConfig(n=1, max_tokens=8, temperature=0.0)), layout)
    torch.manual_seed(0)  # same random policy on both data-parallel replicas
    model = build_qwen2_lm(model_dir, info, init_method_std=0.02)
    sync = MegatronWeightSync(model, model_dir, engine, WeightSyncConfig(
        bucket_bytes=args.bucket_mb * 2**20, engine_update=args.engine_update))
    return info, layout, model_dir, engine, sync


def _greedy(engine) -> list[list[int]]:
    """2 prompts × 8 greedy tokens on this rank's engine."""
    from sophiavl_mcore.rollout import RolloutRequest, SamplingConfig

    reqs = [RolloutRequest(prompt_token_ids=list(range(5 + 11 * i, 37 + 11 * i))) for i in range(2)]
    out = engine.generate(reqs, SamplingConfig(n=1, max_tokens=8, temperature=0.0))
    return [s.token_ids.tolist() for r in out for s in r.samples]


def _stream(sync):
    """The sync's own HF stream (collective): the transfers and merges of one sync,
    yielding the full tensors this rank's engine takes, without the engine write."""
    from sophiavl_mcore.weight_sync.transport import local_tensors

    progress = {"received": 0, "tensors": 0, "bytes": 0, "buckets": 0}
    buckets = sync._schedule(sync._gather_meta()[1])  # noqa: SLF001 (bench reuses the stream)
    return sync._hf_stream(buckets, local_tensors(sync.module), progress)  # noqa: SLF001


def _run_timed(fn) -> tuple[float, float]:
    """(this rank's seconds, the slowest rank's) of ``fn`` started behind a barrier."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    mine = time.perf_counter() - start
    worst = torch.tensor([mine], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return mine, float(worst)


def _measure(args: argparse.Namespace, engine, sync) -> dict:
    """First sync + correctness check, then ``--repeats`` interleaved memcpy / sync runs."""
    import torch

    r: dict = {"before": _greedy(engine)}
    r["first"] = sync.sync()
    r["after"] = _greedy(engine)
    hf = [t.clone() for _, t in _stream(sync)]  # same names, shapes, bytes as a sync loads
    dst = [torch.empty_like(t).fill_(1) for t in hf]  # touched: no page faults
    r["bytes_memcpy"] = sum(t.numel() * t.element_size() for t in hf)

    def memcpy() -> None:
        for d, t in zip(dst, hf, strict=True):
            d.copy_(t)

    reports: list = []
    r["memcpy"], r["stream"], r["sync"] = [], [], []
    for _ in range(args.repeats):
        r["memcpy"].append(_run_timed(memcpy))
        r["stream"].append(_run_timed(lambda: [None for _ in _stream(sync)]))
        r["sync"].append(_run_timed(lambda: reports.append(sync.sync())))
    r["reports"] = reports
    dst.clear()
    hf.clear()
    return r


def _rank_row(rank: int, engine: int, r: dict) -> dict:
    reps = r["reports"]
    return {"rank": rank, "engine": engine, "received": reps[-1].bytes_received,
            "loaded": reps[-1].bytes_loaded, "memcpy_bytes": r["bytes_memcpy"],
            "received_all": {x.bytes_received for x in reps}, "loaded_all": {x.bytes_loaded for x in reps},
            "sync": min(x.seconds for x in reps), "sync_wall": min(m for m, _ in r["sync"]),
            "memcpy": min(m for m, _ in r["memcpy"]), "stream": min(m for m, _ in r["stream"]),
            "first": r["first"].seconds,
            "rss": max(x.peak_rss_delta_bytes for x in reps), "tensors": reps[-1].num_tensors,
            "update": reps[-1].engine_update, "before": r["before"], "after": r["after"]}


def _print(args: argparse.Namespace, layout, rows: list[dict], r: dict, bytes_model: int) -> None:
    import torch

    memcpy = min(w for _, w in r["memcpy"])
    sync = min(w for _, w in r["sync"])
    pairs = statistics.median(m[1] / s[1] for m, s in zip(r["memcpy"], r["sync"], strict=True))
    print(f"\nSPMD weight sync bench: {layout.world} ranks (trainer TP={TP} x DP={layout.world // TP}), "
          f"{layout.num_engines} engines of RTP={layout.rtp}; model {bytes_model / 1e9:.3f} GB float32 "
          f"({args.layers} layers x {args.hidden}, {rows[0]['tensors']} HF tensors), bucket <= "
          f"{args.bucket_mb} MB, engine_update={rows[0]['update']}, threads={torch.get_num_threads()}, "
          f"{args.repeats} interleaved runs each")
    print("per rank: bytes of one sync; seconds = best run on that rank (sync: SyncReport.seconds;")
    print("stream: the sync's transfers + merges alone, no engine write)")
    print(f"{'rank':>4}{'engine':>8}{'MB received':>13}{'MB loaded':>11}{'MB memcpy':>11}"
          f"{'sync s':>9}{'stream s':>10}{'memcpy s':>10}{'first sync s':>14}{'peak RSS MB':>13}")
    for x in rows:
        print(f"{x['rank']:>4}{x['engine']:>8}{x['received'] / 1e6:>13.1f}{x['loaded'] / 1e6:>11.1f}"
              f"{x['memcpy_bytes'] / 1e6:>11.1f}{x['sync']:>9.3f}{x['stream']:>10.3f}{x['memcpy']:>10.3f}"
              f"{x['first']:>14.3f}{x['rss'] / 1e6:>13.1f}")
    print(f"all ranks (a run = its slowest rank): best sync {sync:.3f} s "
          f"({rows[0]['loaded'] / sync / 1e9:.2f} GB/s loaded per rank), best memcpy {memcpy:.3f} s; "
          f"best-vs-best {memcpy / sync:.3f}, pair median {pairs:.3f}; best stream only "
          f"{min(w for _, w in r['stream']):.3f} s")
    tokens = [x["after"] for x in rows]
    same = all(t == tokens[0] for t in tokens)
    moved = all(x["after"] != x["before"] for x in rows)
    for e in range(layout.num_engines):
        print(f"greedy after the first sync, engine {e} (ranks {layout.ranks_of(e)}): "
              f"{rows[layout.leader(e)]['after']}")
    print(f"engines agree token for token: {same}; differ from the zero initial weights: {moved}")
    ratio = memcpy / sync
    status = "ok" if ratio >= 0.5 and same and moved else ("wrong" if not (same and moved) else "short")
    print(f"RESULT weight_sync_spmd throughput_ratio={ratio:.3f} baseline=memcpy target=0.5 "
          f"status={status} bytes_received_max_rank={max(x['received'] for x in rows)} "
          f"bytes_model={bytes_model}")


def main() -> None:
    args = _args()
    import torch.distributed as dist

    from sophiavl_mcore.logging import setup_logging
    from sophiavl_mcore.parallel import destroy_parallel
    from sophiavl_mcore.rollout.spmd import close_spmd_engine

    setup_logging()
    info, layout, model_dir, engine, sync = _setup(args)
    r = _measure(args, engine, sync)
    rows: list = [None] * info.world_size
    dist.all_gather_object(rows, _rank_row(info.rank, layout.engine_of(info.rank), r))
    for x in rows:  # every sync moves the same bytes; the memcpy copies exactly what is loaded
        assert len(x["received_all"]) == 1 and len(x["loaded_all"]) == 1, x
        assert x["loaded"] == x["memcpy_bytes"], x
    if info.rank == 0:
        _print(args, layout, rows, r, sync.bytes_model)
    dist.barrier()
    close_spmd_engine(engine)
    destroy_parallel()
    if info.rank == 0:
        shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
