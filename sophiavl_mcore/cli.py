"""The command line shared by the training entry points (``train``, ``trm_train``):
``--config RECIPE [--dry-run] [key.sub=value ...]`` → typed config → dry run or job."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def job_parser(description: str, dry_run_help: str) -> argparse.ArgumentParser:
    """``--config``, ``--dry-run`` and the dotted overrides; callers add their own flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser


def run_job(args: argparse.Namespace, cls: type[T], dry_run: Callable[[T], Any],
            train: Callable[[T], Any], extra_overrides: Sequence[str] = ()) -> int:
    """Load ``args.config`` + overrides into ``cls`` (every key checked before anything is
    built), then dry-run or train; the process group is torn down at the end."""
    import torch

    from sophiavl_mcore.config import load_config
    from sophiavl_mcore.logging import setup_logging

    setup_logging()
    cfg = load_config(args.config, [*args.overrides, *extra_overrides], cls=cls)
    if args.dry_run:
        dry_run(cfg)
        return 0
    train(cfg)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
