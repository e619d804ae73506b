"""Convert an HF Qwen2/Qwen2.5(-VL) safetensors checkpoint to per-rank Megatron shards.

    python tools/convert_hf_to_mcore.py HF_DIR OUT_DIR --tp 8 --pp 4 [--te] [--dtype bf16] [--no-verify]

Streaming (memory ~ one layer), validated from headers before any tensor is read; an
HF_DIR with checksums.json (as this project's exports have) is checked against it first.
OUT_DIR gets checksums.json over what was written.
Format: see sophiavl_mcore/checkpoint/convert.py.
"""

from __future__ import annotations

import argparse
import logging

import torch

from sophiavl_mcore.checkpoint import convert_hf_to_mcore

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--layers-per-stage", type=int, nargs="*", default=None)
    ap.add_argument("--te", action="store_true", help="Transformer Engine parameter names")
    ap.add_argument("--vocab-divisible-by", type=int, default=1)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: keep")
    ap.add_argument("--no-verify", action="store_true",
                    help="do not check HF_DIR against its checksums.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    out = convert_hf_to_mcore(
        args.hf_dir, args.out_dir, args.tp, args.pp, layers_per_stage=args.layers_per_stage,
        te=args.te, vocab_divisible_by=args.vocab_divisible_by,
        dtype=DTYPES[args.dtype] if args.dtype else None, verify=not args.no_verify,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
