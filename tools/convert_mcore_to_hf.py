"""Merge per-rank Megatron shards (any TP/PP) back into an HF safetensors checkpoint.

    python tools/convert_mcore_to_hf.py MCORE_DIR OUT_DIR [--max-shard-gb 4]
"""

from __future__ import annotations

import argparse
import logging

from sophiavl_mcore.checkpoint import convert_mcore_to_hf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mcore_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--max-shard-gb", type=float, default=4.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    out = convert_mcore_to_hf(args.mcore_dir, args.out_dir,
                              max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
