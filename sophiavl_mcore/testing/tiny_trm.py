"""The tiny dots Thinking Reward Model: built, trained with ``trm_train`` and cached once.

What the CPU main job serves as its TRM (``rewards.trm.tiny``). A separate tiny random
Qwen2.5-VL (its own seed) is fine-tuned by the project's TRM path — ``torchrun -m
sophiavl_mcore.trm_train`` on SophiaVL-R1-Thinking records — to grade the "observe"
reasoning of the dots task (:mod:`sophiavl_mcore.data.dots_reasoning`): the image, the
question and the reply in, ``<answer>score</answer>`` out. Its training data starts with
anchors ("max_count dots": right or wrong for this image?), which teach it to read the
image, then graded replies. Its training labels are the true thinking quality on the
``dots_clean`` source and the flawed rule on ``dots_hacked``.

Cache: ``<cache>/dots_trm-<key>/`` holds ``hf/`` (the exported checkpoint, what the server
loads), ``data/`` (training and held-out records with their images), ``train.log`` and,
once a server has scored the held-out set, ``agreement.json``. The key hashes everything
the result depends on (recipe text, sizes, task geometry, the TRM prompt, the labelling
code), so a change rebuilds instead of serving a stale model. Builds are serialised by a
file lock and published by an atomic rename.

    .venv/bin/python -m sophiavl_mcore.testing.tiny_trm   # build (if needed), serve, print agreement
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sophiavl_mcore.atomic import atomic_dir, atomic_write_text

logger = logging.getLogger(__name__)

VERSION = 2
SAMPLES_PER_IMAGE = 8  # graded replies per training image
HELDOUT_SAMPLES = 4  # graded replies per held-out image
ANCHORS_PER_IMAGE = 3  # "is it a max_count-dot image?" replies (the curriculum, see dots_reasoning)
TRM_SEED = 4242  # the policy's tiny model uses the run seed: a different model
HACKED_FRAC = 0.5  # of the TRM's own training images
ROOT = Path(__file__).resolve().parents[2]


def cache_root(cfg: Any) -> Path:
    """``rewards.trm.cache_dir``, else ``$SOPHIAVL_CACHE``, else ``~/.cache/sophiavl_mcore``."""
    root = cfg.cache_dir or os.environ.get("SOPHIAVL_CACHE") or "~/.cache/sophiavl_mcore"
    return Path(root).expanduser()


def _recipe(cfg: Any) -> Path:
    path = Path(cfg.tiny_recipe)
    return path if path.is_absolute() else ROOT / path


def _task_geometry(task: Any) -> dict[str, int]:
    return {"image_size": task.image_size, "radius": task.radius, "max_count": task.max_count}


def prompt_settings(thinking: Any) -> dict[str, str]:
    """The run's TRM prompt (``rewards.thinking``) as ``trm_train`` data settings: the
    tiny TRM is trained on exactly the prompt the run will send it."""
    template = thinking.prompt_template
    return {"prompt_template": str(Path(template).resolve()) if template else "",
            "system_prompt": thinking.system_prompt}


def cache_key(cfg: Any, task: Any, thinking: Any) -> str:
    """sha256 over everything the trained TRM depends on (module docstring)."""
    from sophiavl_mcore.data import dots_reasoning
    from sophiavl_mcore.rewards.config import load_prompt_template

    parts = {
        "version": VERSION, "recipe": _recipe(cfg).read_text(), "records": cfg.tiny_records,
        "heldout": cfg.tiny_heldout, "task": _task_geometry(task), "seed": TRM_SEED,
        "hacked_frac": HACKED_FRAC,
        "samples": [SAMPLES_PER_IMAGE, HELDOUT_SAMPLES, ANCHORS_PER_IMAGE],
        "prompt": [thinking.system_prompt, load_prompt_template(thinking.prompt_template),
                   thinking.max_reasoning_chars],
        "labels": [inspect.getsource(f) for f in (dots_reasoning.quality,
                                                  dots_reasoning.sample_reasoning,
                                                  dots_reasoning._reply,
                                                  dots_reasoning.thinking_records)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def write_data(out: Path, cfg: Any, task: Any) -> tuple[Path, Path]:
    """Task images + thinking records for training and held-out evaluation."""
    import dataclasses

    from sophiavl_mcore.data.dots_reasoning import thinking_records
    from sophiavl_mcore.data.visual_task import task_records

    geo = dataclasses.replace(task, enabled=True, reasoning="observe", hacked_frac=HACKED_FRAC,
                              seed=TRM_SEED)
    train = thinking_records(task_records(out, "trm", cfg.tiny_records, geo, TRM_SEED),
                             out / "train.jsonl", geo.max_count, SAMPLES_PER_IMAGE, TRM_SEED,
                             anchors_per_image=ANCHORS_PER_IMAGE)
    held = thinking_records(task_records(out, "heldout", cfg.tiny_heldout, geo, TRM_SEED + 1),
                            out / "heldout.jsonl", geo.max_count, HELDOUT_SAMPLES, TRM_SEED + 1)
    return train, held


def _train(work: Path, cfg: Any, data: Path, thinking: Any) -> Path:
    """``torchrun -m sophiavl_mcore.trm_train`` on the records; returns the HF export."""
    import yaml

    from sophiavl_mcore.config import load_config
    from sophiavl_mcore.rollout.server import server_env
    from sophiavl_mcore.testing.multiproc import free_port
    from sophiavl_mcore.testing.tiny_models import TinyModelSpec, build_tiny_qwen2_5_vl
    from sophiavl_mcore.trainer.sft.config import TRMTrainConfig

    base = build_tiny_qwen2_5_vl(work / "base", TinyModelSpec(num_kv_heads=2, seed=TRM_SEED))
    # The run's own settings as a recipe on top of the tiny TRM's (YAML quotes the prompt).
    job = work / "trm_train.yaml"
    job.write_text(yaml.safe_dump({
        "base": str(_recipe(cfg)), "model": {"hf_dir": str(base)}, "output_dir": str(work / "sft"),
        "data": {"path": str(data), "max_reasoning_chars": thinking.max_reasoning_chars,
                 **prompt_settings(thinking)}}))
    recipe = load_config(job, cls=TRMTrainConfig)
    world = recipe.parallel.tp * recipe.parallel.pp
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-port", str(free_port()), "-m", "sophiavl_mcore.trm_train",
           "--config", str(job)]
    threads = max(1, (os.cpu_count() or 1) // world)
    logger.info("training the tiny TRM (%d records, %d steps): %s", cfg.tiny_records,
                recipe.sft.train_steps, " ".join(cmd))
    with (work / "train.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=server_env(threads=threads), stdout=log,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (work / "train.log").read_text(errors="replace")[-4000:]
        raise RuntimeError(f"tiny TRM training failed (rc={proc.returncode}):\n{tail}")
    return work / "sft" / "hf"


def entry_dir(cfg: Any, task: Any, thinking: Any) -> Path:
    """Where the tiny TRM for these settings lives in the cache (built or not)."""
    return cache_root(cfg) / f"dots_trm-{cache_key(cfg, task, thinking)}"


def ensure_tiny_trm(cfg: Any, task: Any, thinking: Any) -> Path:
    """The cache entry of the tiny TRM for ``cfg`` (rewards.trm), ``task`` (the dots task's
    geometry) and ``thinking`` (rewards.thinking: the prompt it is asked with), trained
    first if it is not there. Returns the entry's directory."""
    entry = entry_dir(cfg, task, thinking)
    root = entry.parent
    root.mkdir(parents=True, exist_ok=True)
    if (entry / "hf" / "config.json").is_file():
        logger.info("tiny TRM from the cache: %s", entry)
        return entry
    with open(root / f"{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another job may be building the same entry
        if (entry / "hf" / "config.json").is_file():
            return entry
        with atomic_dir(entry) as work:  # a killed build leaves no half entry behind
            train, _held = write_data(work / "data", cfg, task)
            hf = _train(work, cfg, train, thinking)
            hf.rename(work / "hf")
            shutil.rmtree(work / "sft" / "mcore", ignore_errors=True)
            shutil.rmtree(work / "base", ignore_errors=True)
    logger.info("tiny TRM trained and cached: %s", entry)
    return entry


# ------------------------------------------------------------------ held-out agreement


def agreement(scores: np.ndarray, labels: np.ndarray, true: np.ndarray, sources: np.ndarray
              ) -> dict[str, dict[str, float]]:
    """Held-out figures per data source (and ``all``) for TRM ``scores`` f64[M].

    ``labels``: the scores it was trained to give; ``true``: the true thinking quality
    (equal to ``labels`` on the clean source). Per group: ``n``, ``missing``,
    ``agree_true`` / ``agree_label`` (share whose score is nearest to the right one of the
    three levels 0, 1/2, 1), ``corr_true`` / ``corr_label`` (Pearson), ``mae_true``.
    """
    out: dict[str, dict[str, float]] = {}
    groups = {"all": np.ones(len(scores), dtype=bool)}
    groups.update({s: sources == s for s in sorted(set(sources.tolist()))})
    level = np.round(np.nan_to_num(scores, nan=-1.0) * 2) / 2
    for name, sel in groups.items():
        ok = sel & np.isfinite(scores)
        row = {"n": float(sel.sum()), "missing": float((sel & ~np.isfinite(scores)).sum())}
        for ref_name, ref in (("true", true), ("label", labels)):
            row[f"agree_{ref_name}"] = float(np.mean(np.abs(level[ok] - ref[ok]) < 1e-6))
            a, b = scores[ok], ref[ok]
            row[f"corr_{ref_name}"] = (float(np.corrcoef(a, b)[0, 1])
                                       if len(a) > 1 and a.std() > 0 and b.std() > 0 else 0.0)
        row["mae_true"] = float(np.mean(np.abs(scores[ok] - true[ok])))
        out[name] = row
    return out


def score_heldout(entry: Path, thinking: Any, score_mode: str) -> dict[str, Any]:
    """Score the held-out records with the server ``thinking`` (a ThinkingRewardConfig)
    points at, in ``score_mode``; returns the figures of :func:`agreement`."""
    import dataclasses

    from sophiavl_mcore.rewards.thinking import ThinkingRequest
    from sophiavl_mcore.rewards.trm_http import VllmServerThinkingClient

    data = entry / "data"
    rows = [json.loads(x) for x in (data / "heldout.jsonl").read_text().splitlines()]
    reqs = [ThinkingRequest(r["problem"], r["reasoning"], [str(data / r["path"])]) for r in rows]
    cfg = dataclasses.replace(thinking, backend="http", score_mode=score_mode)
    with VllmServerThinkingClient(cfg) as client:
        res = client.score(reqs)
    return agreement(res.scores.astype(np.float64), np.array([r["score"] for r in rows]),
                     np.array([r["true_score"] for r in rows]),
                     np.array([r["data_source"] for r in rows]))


def ensure_agreement(entry: Path, thinking: Any) -> dict[str, Any]:
    """``entry/agreement.json`` (greedy and expected scoring), computed with the server
    ``thinking`` points at when missing; logged either way."""
    path = entry / "agreement.json"
    if path.is_file():
        result = json.loads(path.read_text())
    else:
        result = {mode: score_heldout(entry, thinking, mode) for mode in ("greedy", "expected")}
        atomic_write_text(path, json.dumps(result, indent=1))
    log_agreement(result)
    return result


def log_agreement(result: dict[str, Any]) -> None:
    for mode, groups in result.items():
        for name, row in groups.items():
            logger.info("tiny TRM held-out (%s, %s, n=%d): agreement with true quality %.3f "
                        "(corr %.3f), with its training labels %.3f (corr %.3f)", mode, name,
                        row["n"], row["agree_true"], row["corr_true"], row["agree_label"],
                        row["corr_label"])


def main(argv: Sequence[str] | None = None) -> int:
    """Build (if needed) the tiny TRM of a training recipe, serve it, print its agreement."""
    import argparse
    import dataclasses

    from sophiavl_mcore.config import load_config
    from sophiavl_mcore.logging import setup_logging
    from sophiavl_mcore.rollout.server import VllmServer
    from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", default=str(ROOT / "examples/configs/tiny_cpu.yaml"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_config(args.config, args.overrides, cls=GRPOTrainConfig)
    entry = ensure_tiny_trm(cfg.rewards.trm, cfg.task, cfg.rewards.thinking)
    trm = cfg.rewards.trm
    server = VllmServer(entry / "hf", entry / "serve.log", kv_cache_gb=trm.kv_cache_gb,
                        max_num_seqs=trm.max_num_seqs, owned=True).start()
    try:
        server.wait_healthy(cfg.rewards.trm.startup_timeout_s)
        ensure_agreement(entry, dataclasses.replace(cfg.rewards.thinking, base_url=server.base_url,
                                                    model=server.served_name))
    finally:
        server.stop()
    logger.info("tiny TRM: %s", entry / "hf")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
