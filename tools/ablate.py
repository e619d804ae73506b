"""The paper's Table 3 in miniature: four reward variants × seeds of one recipe → table + PNG.

    .venv/bin/python tools/ablate.py [--recipe examples/configs/tiny_cpu.yaml]
        [--seeds 1 2] [--out runs/ablate] [key.sub=value ...]

Variants (the rows of the paper's Table 3):

    grpo            plain GRPO: outcome reward only          use_thinking=false
    thinking        thinking reward, no trust, no annealing  use_trust=false use_annealing=false
    annealing       thinking reward with annealing, no trust use_trust=false
    trust_grpo      full Trust-GRPO (trust + annealing)      (the recipe as it is)

Each (variant, seed) is one real training run (``torchrun --nproc-per-node 2 -m
sophiavl_mcore.train``) in ``<out>/<variant>-s<seed>``; a run whose ``run_state.json``
says complete is not run again, so an interrupted ablation resumes. The runs share one
TRM server (the recipe's tiny TRM, started here once). Written to ``<out>``:
``table.md`` (mean ± std over seeds), ``results.json`` (per run) and ``curves.png``.

Columns: final outcome reward (mean of the last 5 steps), area under the outcome curve
(mean over all steps), held-out greedy accuracy at the end, mean γ over the run on the
hacked and the clean subset, μc − μw on each, and the true thinking quality of the
policy's replies at the end (oracle, last 5 steps) on each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("ablate")

VARIANTS: dict[str, list[str]] = {
    "grpo": ["rewards.trust_grpo.use_thinking=false"],
    "thinking": ["rewards.trust_grpo.use_trust=false", "rewards.trust_grpo.use_annealing=false"],
    "annealing": ["rewards.trust_grpo.use_trust=false"],
    "trust_grpo": [],
}
HACKED, CLEAN = "dots_hacked", "dots_clean"
COLORS = {"grpo": (90, 90, 90), "thinking": (214, 39, 40), "annealing": (255, 127, 14),
          "trust_grpo": (31, 119, 180)}


def run_one(recipe: Path, out: Path, seed: int, overrides: Sequence[str],
            timeout_s: float) -> list[dict]:
    """One training run (skipped when already complete); returns its metrics.jsonl."""
    from sophiavl_mcore.testing.multiproc import free_port

    state = out / "run_state.json"
    if not (state.is_file() and json.loads(state.read_text()).get("status") == "complete"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "sophiavl_mcore.train", "--config",
               str(recipe), f"output_dir={out}", f"seed={seed}", *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with (out / "launcher.log").open("w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"{out}: exit {proc.returncode}; see {out / 'launcher.log'}")
        logger.info("%s: %.0f s", out.name, time.monotonic() - t0)
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _mean(steps: list[dict], key: str, last: int | None = None) -> float:
    vals = [s[key] for s in steps if key in s and np.isfinite(s[key])]
    vals = vals[-last:] if last else vals
    return float(np.mean(vals)) if vals else float("nan")


def summarize(steps: list[dict]) -> dict[str, float]:
    """The table's columns for one run (module docstring)."""
    val = [s["val/accuracy"] for s in steps if "val/accuracy" in s]
    out = {"final_outcome": _mean(steps, "reward/outcome_mean", 5),
           "auc_outcome": _mean(steps, "reward/outcome_mean"),
           "val_accuracy": float(val[-1]) if val else float("nan")}
    for name, src in (("hacked", HACKED), ("clean", CLEAN)):
        out[f"gamma_{name}"] = _mean(steps, f"reward/source/{src}/gamma_mean")
        out[f"gap_{name}"] = _mean(steps, f"reward/source/{src}/mu_gap_mean")
        out[f"true_thinking_{name}"] = _mean(steps, f"reward/source/{src}/thinking_true_mean", 5)
    return out


COLUMNS = [("final_outcome", "final R^o"), ("auc_outcome", "AUC R^o"),
           ("val_accuracy", "held-out acc"), ("gamma_hacked", "γ hacked"),
           ("gamma_clean", "γ clean"), ("gap_hacked", "μc−μw hacked"),
           ("gap_clean", "μc−μw clean"), ("true_thinking_hacked", "true q hacked"),
           ("true_thinking_clean", "true q clean")]


def table(results: dict[str, dict[int, dict[str, float]]]) -> str:
    """Markdown: one row per variant, mean ± std over seeds ("n/a" where undefined)."""
    seeds = sorted({s for runs in results.values() for s in runs})
    lines = [f"seeds: {seeds}", "",
             "| variant | " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for variant, runs in results.items():
        cells = []
        for key, _ in COLUMNS:
            vals = np.array([r[key] for r in runs.values()], dtype=float)
            vals = vals[np.isfinite(vals)]
            cells.append("n/a" if not vals.size else
                         f"{vals.mean():.3f} ± {vals.std():.3f}" if vals.size > 1 else f"{vals[0]:.3f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _panel(draw, box, title, series, y_range) -> None:
    """One line chart in ``box`` (x0, y0, x1, y1): ``series`` = [(color, xs, ys)]."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0 + 6, y0 - 16), title, fill=(0, 0, 0))
    lo, hi = y_range
    for frac in (0.0, 0.5, 1.0):
        y = y1 - frac * (y1 - y0)
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        draw.text((x0 - 34, y - 6), f"{lo + frac * (hi - lo):.2f}", fill=(0, 0, 0))
    xmax = max((max(xs) for _, xs, _ in series if len(xs)), default=1)
    draw.text((x1 - 40, y1 + 4), f"step {xmax}", fill=(0, 0, 0))
    for color, xs, ys in series:
        pts = [(x0 + (x / xmax) * (x1 - x0), y1 - (np.clip(y, lo, hi) - lo) / (hi - lo) * (y1 - y0))
               for x, y in zip(xs, ys, strict=True) if np.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)


def _curve(runs: dict[int, list[dict]], key: str, smooth: int = 5) -> tuple[list, list]:
    """Mean over seeds of ``key`` per step, moving average over ``smooth`` steps."""
    by_step: dict[int, list[float]] = {}
    for steps in runs.values():
        for s in steps:
            if key in s and np.isfinite(s[key]):
                by_step.setdefault(s["step"], []).append(s[key])
    xs = sorted(by_step)
    ys = np.array([np.mean(by_step[x]) for x in xs])
    if smooth > 1 and len(ys) >= smooth:
        ys = np.convolve(np.pad(ys, (smooth - 1, 0), mode="edge"), np.ones(smooth) / smooth,
                         mode="valid")
    return xs, list(ys)


def plot(curves: dict[str, dict[int, list[dict]]], path: Path) -> None:
    """Outcome reward, held-out accuracy, γ on the hacked subset and true thinking quality
    per step, one line per variant (mean over seeds)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (1000, 700), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    panels = [("outcome reward R^o (5-step mean)", "reward/outcome_mean", (0, 1), 5),
              ("held-out greedy accuracy", "val/accuracy", (0, 1), 1),
              ("gamma, hacked subset (5-step mean)", f"reward/source/{HACKED}/gamma_mean", (0, 1), 5),
              ("true thinking quality (5-step mean)", "reward/thinking_true_mean", (0, 1), 5)]
    for i, (title, key, yr, smooth) in enumerate(panels):
        col, row = i % 2, i // 2
        box = (60 + col * 480, 50 + row * 310, 480 + col * 480, 320 + row * 310)
        series = [(COLORS.get(v, (0, 0, 0)), *_curve(runs, key, smooth))
                  for v, runs in curves.items()]
        _panel(draw, box, title, series, yr)
    for j, variant in enumerate(curves):
        draw.line([(70 + j * 200, 678), (100 + j * 200, 678)], fill=COLORS.get(variant), width=3)
        draw.text((106 + j * 200, 672), variant, fill=(0, 0, 0))
    img.save(path)


def start_shared_trm(recipe: Path, overrides: Sequence[str], out: Path):
    """The recipe's TRM on one server for every run, started the way a training job starts
    its own (``testing.stand_ins``: the tiny TRM built if needed and its held-out
    agreement scored; ``start_local_trm``: ``<out>/trm/server.json``). Returns the handle and the overrides that point
    a run at it (None, [] when the recipe serves no TRM)."""
    from sophiavl_mcore.config import load_config
    from sophiavl_mcore.rewards.trm_server import start_local_trm
    from sophiavl_mcore.testing.stand_ins import resolve_tiny_trm
    from sophiavl_mcore.testing.tiny_trm import ensure_agreement
    from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig

    cfg = load_config(recipe, [*overrides, f"output_dir={out}"], cls=GRPOTrainConfig)
    cfg, tiny_trm = resolve_tiny_trm(cfg)
    trm = start_local_trm(cfg.rewards.trm, out, 0)
    if trm is None:
        return None, []
    trm.wait_healthy()
    thinking = trm.thinking_config(cfg.rewards.thinking)
    if tiny_trm is not None:
        ensure_agreement(tiny_trm, thinking)
    return trm, ["rewards.trm.serve=false", "rewards.thinking.backend=http",
                 f"rewards.thinking.base_url={thinking.base_url}",
                 f"rewards.thinking.model={thinking.model}"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=str(ROOT / "runs/ablate"))
    parser.add_argument("--timeout-s", type=float, default=3600)
    parser.add_argument("overrides", nargs="*", help="key.sub=value for every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = Path(args.recipe).resolve()
    server, shared = start_shared_trm(recipe, args.overrides, out)
    curves: dict[str, dict[int, list[dict]]] = {}
    try:
        for seed in args.seeds:
            for variant in args.variants:
                steps = run_one(recipe, out / f"{variant}-s{seed}", seed,
                                [*args.overrides, *shared, *VARIANTS[variant]], args.timeout_s)
                curves.setdefault(variant, {})[seed] = steps
    finally:
        if server is not None:
            server.stop()
    results = {v: {s: summarize(steps) for s, steps in runs.items()} for v, runs in curves.items()}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (out / "table.md").write_text(text)
    plot(curves, out / "curves.png")
    logger.info("\n%s", text)
    logger.info("table: %s  curves: %s", out / "table.md", out / "curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
