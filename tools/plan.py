"""Per-GPU memory plan, rollout engines and weight-sync bytes per rank of a GRPO recipe on
a cluster shape; exits 1 when it does not fit, 2 when the layout is impossible.

    python tools/plan.py --recipe examples/configs/qwen2_5_vl_72b_64xh100.yaml --nodes 8

Prints each memory term per GPU, both phases, the rollout engines (how many, per node,
prompts and responses each, the vLLM shard on every GPU) and the bytes one rank of each
pipeline stage receives per weight sync, with the worst rank. The model's config.json is
``--model-config``, else ``<model.hf_dir>/config.json``, else the shipped public config
named after the checkpoint directory (tools/configs/; the file used is printed). The
formulas are documented in ``sophiavl_mcore/planner.py``. The activation recompute is the
recipe's ``model.recompute_granularity`` unless ``--recompute`` overrides it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sophiavl_mcore.config import load_config  # noqa: E402
from sophiavl_mcore.planner import (  # noqa: E402
    Cluster,
    PlanError,
    check_fits,
    model_config_path,
    plan_memory,
)
from sophiavl_mcore.trainer.grpo.config import GRPOTrainConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="GPU memory in GiB")
    ap.add_argument("--model-config", default=None, help="HF config.json of the policy")
    ap.add_argument("--recompute", choices=("none", "selective", "full"), default=None,
                    help="override the recipe's model.recompute_granularity")
    ap.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides, cls=GRPOTrainConfig)
        config_path = model_config_path(cfg.model.hf_dir, args.model_config)
        config_json = json.loads(config_path.read_text())
        plan = plan_memory(cfg, Cluster(args.nodes, args.gpus_per_node, args.gpu_mem_gb),
                           config_json,
                           recompute=args.recompute or cfg.model.recompute_granularity or "none")
    except ValueError as err:
        sys.stderr.write(f"plan: {err}\n")
        return 2
    sys.stdout.write(f"model config: {config_path}\n{plan.table()}\n")
    try:
        check_fits(plan)
    except PlanError as err:
        sys.stderr.write(f"REFUSED: {err}\n")
        return 1
    sys.stdout.write("FITS\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
