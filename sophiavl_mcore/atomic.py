"""Atomic writes of files and directories, so that a crash never leaves a half-written
result where a reader looks.

A directory ``<parent>/<name>`` is built in a temp sibling ``<parent>/.<name>.tmp-<nonce>``
(the leading dot keeps it out of globs and listings of finished results), its files and
directories are fsynced, and it is renamed into place. When ``<name>`` already exists, the
old one is first renamed aside to ``.<name>.old-<nonce>``, the new one renamed in, then the
old one deleted: a reader sees the old or the new complete directory (a rename is atomic on
POSIX; between the two renames the name is briefly absent). A process killed before the
rename leaves its temp sibling behind; the next write of the same target removes it
(:func:`remove_stale_siblings`), and restores an old one set aside by a write killed
between the two renames.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)


def fsync_path(path: Path) -> None:
    """Flush a file's (or directory's) data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that readers see the old or the new content."""
    tmp = tmp_sibling(path, secrets.token_hex(4))
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def tmp_sibling(target: Path, nonce: str) -> Path:
    """Where a new ``target`` (a directory, before :func:`publish_dir`, or a file) is
    written first."""
    return target.with_name(f".{target.name}.tmp-{nonce}")


def _siblings(target: Path, kind: str) -> list[Path]:
    prefix = f".{target.name}.{kind}-"
    if not target.parent.is_dir():
        return []
    return [p for p in target.parent.iterdir() if p.name.startswith(prefix)]


def remove_stale_siblings(target: Path) -> list[str]:
    """Clean up after writes of ``target`` that were killed: their temp siblings are
    deleted; when ``target`` is missing but an old one was set aside (killed between
    the two renames of :func:`publish_dir`), the newest such is renamed back first.
    Call on one process, before a new write of ``target`` starts. Returns the names
    removed."""
    old = sorted(_siblings(target, "old"), key=lambda p: p.stat().st_mtime)
    if old and not target.exists():
        os.rename(old.pop(), target)
        logger.warning("restored %s, set aside by an interrupted write", target)
    stale = _siblings(target, "tmp") + old
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        logger.warning("removed %d leftover(s) of interrupted writes of %s: %s", len(stale),
                       target, sorted(p.name for p in stale))
    return sorted(p.name for p in stale)


def publish_dir(tmp: Path, target: Path) -> None:
    """Make the finished directory ``tmp`` become ``target`` (replacing an old one)."""
    dirs = [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_path(path)
    for path in dirs:
        fsync_path(path)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.rename(target, old)
    os.rename(tmp, target)
    fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """``with atomic_dir(target) as tmp:`` write into ``tmp``; on a normal exit ``tmp``
    becomes ``target``, on an exception it is deleted and ``target`` is left as it was.
    One process only (see :func:`tmp_sibling` / :func:`publish_dir` for a collective
    write)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(target)
    tmp = tmp_sibling(target, secrets.token_hex(4))
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
