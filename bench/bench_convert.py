"""HF→mcore conversion throughput vs a plain safetensors read+write of the same bytes.

Builds a synthetic Qwen2 checkpoint of ~1 GB (float32, random bytes), then in the same
run times (a) baseline: safe_open every tensor + save_file of the same tensors, and
(b) ours: convert_hf_to_mcore at TP=2×PP=2. Throughput = checkpoint bytes / seconds.

    python bench/bench_convert.py [--gb 1.0] [--tp 2] [--pp 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sophiavl_mcore.checkpoint import convert_hf_to_mcore
from sophiavl_mcore.checkpoint.mapping import build_plan
from sophiavl_mcore.models.hf_config import read_lm_dims


def make_checkpoint(root: Path, gb: float) -> tuple[Path, int]:
    hidden, layers = 1024, 8
    ffn = int((gb * 2**30 / 4 / layers - 4 * hidden * hidden) / (3 * hidden)) // 64 * 64
    cfg = dict(model_type="qwen2", hidden_size=hidden, num_hidden_layers=layers,
               num_attention_heads=16, num_key_value_heads=4, intermediate_size=ffn,
               vocab_size=32000, rope_theta=1e6, rms_norm_eps=1e-6, hidden_act="silu",
               tie_word_embeddings=False, max_position_embeddings=4096)
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(cfg))
    plan = build_plan(read_lm_dims(cfg), 1, 1)
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=g) for n, s in plan.hf_specs().items()}
    save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    return root, sum(t.numel() * 4 for t in tensors.values())


def baseline(src: Path, dst: Path) -> None:
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, nbytes = make_checkpoint(Path(tmp) / "hf", args.gb)
        best = {"baseline": float("inf"), "convert": float("inf")}
        for i in range(args.repeats):
            # Alternate, and flush dirty pages before each timing so that neither run pays
            # for the other's write-back.
            for name in ("convert", "baseline") if i % 2 else ("baseline", "convert"):
                out = Path(tmp) / f"{name}{i}"
                os.sync()
                t = time.perf_counter()
                if name == "baseline":
                    baseline(src, out)
                else:
                    convert_hf_to_mcore(src, out, args.tp, args.pp, progress=False)
                best[name] = min(best[name], time.perf_counter() - t)
                shutil.rmtree(out)
    gbs = {k: nbytes / v / 1e9 for k, v in best.items()}
    ratio = gbs["convert"] / gbs["baseline"]
    print(f"checkpoint: {nbytes / 1e9:.2f} GB float32, convert layout TP={args.tp} PP={args.pp}")
    print(f"{'method':<34}{'seconds':>10}{'GB/s':>10}")
    print(f"{'safetensors read+write (baseline)':<34}{best['baseline']:>10.2f}{gbs['baseline']:>10.2f}")
    print(f"{'convert_hf_to_mcore (ours)':<34}{best['convert']:>10.2f}{gbs['convert']:>10.2f}")
    status = "ok" if ratio >= 0.5 else "short"
    print(f"RESULT convert throughput_ratio={ratio:.2f} baseline=safetensors-read-write "
          f"target=0.5 status={status}")


if __name__ == "__main__":
    main()
