"""Merge per-rank Megatron shards (any TP/PP) back into an HF safetensors checkpoint.

    python tools/convert_mcore_to_hf.py MCORE_DIR OUT_DIR [--max-shard-gb 4] \
        [--serving-files-from HF_DIR] [--no-verify]

MCORE_DIR is checked against its manifest first (a training checkpoint's manifest.json,
or checksums.json: size and sha256 of every file); a damaged file stops the conversion
with its name. OUT_DIR gets checksums.json over what was written.
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
    ap.add_argument("--serving-files-from", default=None, metavar="HF_DIR",
                    help="copy tokenizer / processor / generation files from this HF dir")
    ap.add_argument("--no-verify", action="store_true",
                    help="read MCORE_DIR without checking it against its manifest")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    out = convert_mcore_to_hf(args.mcore_dir, args.out_dir,
                              max_shard_bytes=int(args.max_shard_gb * 2**30),
                              verify=not args.no_verify,
                              serving_files_from=args.serving_files_from)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
