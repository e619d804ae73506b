"""The command line shared by the training entry points (``train``, ``trm_train``):
``--config RECIPE [--dry-run] [key.sub=value ...]`` → typed config → dry run or job.

A configuration error — a bad key or value while loading the recipe, or anything the
dry run rejects (layouts, the model's config.json), all ``ValueError``\\ s carrying every
number — ends the process with one line on stderr, ``<ErrorType>: <message>``, and exit
status 1 instead of a traceback. Callers of :func:`run_job` (tests) still get the
exception itself; errors raised while training keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

_MARK = "cli_config_error"  # set on a ValueError raised while loading / dry-running


def job_parser(description: str, dry_run_help: str) -> argparse.ArgumentParser:
    """``--config``, ``--dry-run`` and the dotted overrides; callers add their own flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser


def config_error_hook(previous: Callable[..., Any]) -> Callable[..., Any]:
    """A ``sys.excepthook`` printing marked configuration errors as one line; anything
    else goes to ``previous`` (the full traceback)."""

    def hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
        if getattr(err, _MARK, False):
            sys.stderr.write(f"{kind.__name__}: {err}\n")
        else:
            previous(kind, err, tb)

    hook.one_line_config_errors = True  # type: ignore[attr-defined]
    return hook


def one_line_config_errors() -> None:
    """Install :func:`config_error_hook` once per process."""
    if not getattr(sys.excepthook, "one_line_config_errors", False):
        sys.excepthook = config_error_hook(sys.excepthook)


def run_job(args: argparse.Namespace, cls: type[T], dry_run: Callable[[T], Any],
            train: Callable[[T], Any], extra_overrides: Sequence[str] = ()) -> int:
    """Load ``args.config`` + overrides into ``cls`` (every key checked before anything is
    built), then dry-run or train; the process group is torn down at the end."""
    from sophiavl_mcore.config import load_config
    from sophiavl_mcore.logging import setup_logging

    setup_logging()
    one_line_config_errors()
    try:
        cfg = load_config(args.config, [*args.overrides, *extra_overrides], cls=cls)
        if args.dry_run:
            dry_run(cfg)
            return 0
    except ValueError as err:
        setattr(err, _MARK, True)
        raise
    train(cfg)
    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
