"""Checksum manifests: the size and sha256 every file of a directory must have, and the
check readers run before they trust the files.

Two manifests exist:

- a training checkpoint's ``manifest.json`` (format :data:`TRAIN_FORMAT`, written by
  ``checkpoint.training.CheckpointManager``), sealed by ``COMPLETE``, which records
  the manifest's own sha256;
- ``checksums.json`` (format :data:`CHECKSUMS_FORMAT`) beside the files of an HF export
  or a Megatron conversion::

      {"format": "sophiavl_mcore/checksums", "version": 1,
       "files": {"model.safetensors": {"size": 123, "sha256": "…"}, …}}

:func:`verify_dir` is what exports and conversions call before reading a directory:
every file a manifest lists must have its recorded size (and sha256), and every file the
reader is about to use must be listed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sophiavl_mcore.atomic import atomic_write_text
from sophiavl_mcore.checkpoint.st_io import CheckpointError

logger = logging.getLogger(__name__)

TRAIN_FORMAT = "sophiavl_mcore/training-checkpoint"
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
CHECKSUMS = "checksums.json"
CHECKSUMS_FORMAT = "sophiavl_mcore/checksums"
_HASH_CHUNK = 8 * 2**20


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is missing or differs from its manifest (names the file)."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: str | Path) -> Path:
    """Write ``checksums.json`` for every file under ``directory`` (recursively, except
    itself), replacing any previous one atomically. Returns its path."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != CHECKSUMS:
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    out = directory / CHECKSUMS
    atomic_write_text(out, json.dumps({"format": CHECKSUMS_FORMAT, "version": 1, "files": files},
                                      indent=1))
    return out


def read_training_manifest(path: str | Path) -> dict[str, Any]:
    """A training checkpoint's manifest, after checking it against ``COMPLETE``."""
    path = Path(path)
    marker, manifest_path = path / COMPLETE, path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointCorruptError(f"{manifest_path} is missing")
    try:
        recorded = json.loads(marker.read_text())["manifest_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointCorruptError(f"{marker} is unreadable: {err!r}") from err
    digest = sha256_file(manifest_path)
    if recorded != digest:
        raise CheckpointCorruptError(f"{manifest_path} is corrupted: sha256 {digest}, {marker} "
                                     f"records {recorded}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != TRAIN_FORMAT:
        raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r}, "
                              f"expected {TRAIN_FORMAT!r}")
    return manifest


def check_files(directory: Path, files: Mapping[str, Mapping[str, Any]],
                names: Iterable[str] | None = None, *, sha256: bool = True,
                listed_in: str = MANIFEST) -> list[str]:
    """Problems of ``names`` (default: every listed file) against ``files``: not listed,
    missing, another size, or (``sha256``) other content."""
    problems = []
    for rel in files if names is None else names:
        p, want = directory / rel, files.get(rel)
        if want is None:
            problems.append(f"{p} is not listed in {directory / listed_in}")
        elif not p.is_file():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != want["size"]:
            problems.append(f"{p} has {p.stat().st_size} bytes, {listed_in} records {want['size']}")
        elif sha256 and "sha256" in want and sha256_file(p) != want["sha256"]:
            problems.append(f"{p} is corrupted (its sha256 differs from {listed_in})")
    return problems


def _read_checksums(directory: Path) -> dict[str, Any]:
    path = directory / CHECKSUMS
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("format") != CHECKSUMS_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {data.get('format')!r}, expected {CHECKSUMS_FORMAT!r}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointCorruptError(f"{path} is unreadable: {err}") from err
    return files


def verify_dir(directory: str | Path, needed: Iterable[str] = (), *, sha256: bool = True,
               require: bool = False) -> str:
    """Check a directory against its manifest before reading it.

    Uses the training ``manifest.json`` (with ``COMPLETE``) when present, else
    ``checksums.json``. Every file in ``needed`` (the files the caller will read; empty:
    every listed file) must be listed and match in size and, unless ``sha256=False``,
    content; the other listed files must be present with their size (a training
    checkpoint's optimizer states are not hashed for an export). Without a manifest: an
    error when ``require``, else a logged warning that nothing was verified.

    Returns the manifest's file name, or "" when there was none.
    Raises :class:`CheckpointCorruptError` naming every bad file (up to ten).
    """
    directory = Path(directory)
    if (directory / MANIFEST).exists() or (directory / COMPLETE).exists():
        kind, files = MANIFEST, read_training_manifest(directory)["files"]
    elif (directory / CHECKSUMS).exists():
        kind, files = CHECKSUMS, _read_checksums(directory)
    elif require:
        raise CheckpointError(f"{directory} has neither {MANIFEST} nor {CHECKSUMS}: its files "
                              "cannot be verified (read it unverified with verify=False)")
    else:
        logger.warning("%s has neither %s nor %s: reading it unverified", directory, MANIFEST,
                       CHECKSUMS)
        return ""
    hashed = list(dict.fromkeys(needed)) or list(files)
    problems = check_files(directory, files, hashed, sha256=sha256, listed_in=kind)
    problems += check_files(directory, files, [f for f in files if f not in hashed],
                            sha256=False, listed_in=kind)
    if problems:
        raise CheckpointCorruptError(f"{directory} does not match its {kind}: "
                                     + "; ".join(problems[:10]))
    return kind
