"""Readers of benchmark files in VLMEvalKit's layout (TSV, and XLSX when openpyxl is
installed), and :func:`read_benchmark`, which picks the reader by file type.

The TSV layout (one row per question, tab-separated, ``"``-quoted as pandas writes it):

- required: ``index``, ``question``, ``answer`` (a file without one of these columns
  raises :class:`~sophiavl_mcore.eval.samples.EvalDataError`);
- ``image``: a base64-encoded PNG/JPEG/…; or, when at most 64 characters long, the
  ``index`` of another row whose image this row reuses (VLMEvalKit's rule: MME's second
  question of an image points at the first); or a Python-literal list of base64 strings
  (several images, MMMU);
- optional: ``image_path``, ``hint``, option columns ``A``, ``B``, … (non-empty ones are
  the options), ``category``, ``l2-category`` (or ``l2_category``), ``split``; MathVista's
  ``choices`` (a list literal, used as options A, B, … when there are no option columns);
  every other non-empty column lands in :attr:`EvalSample.extras` (MathVista's
  ``question_type``, ``answer_type``, ``precision``, ``skills``, ``task``, …).

Empty cells and pandas' ``nan`` count as missing. A bad row (a required field empty, an
image that is not base64 or not an image, a reference to an index that has no image,
a repeated index) is skipped and reported as a
:class:`~sophiavl_mcore.eval.samples.SkippedRow`; the reader never stops on one.
Lists are read with :func:`ast.literal_eval` (literals only; nothing is unpickled or
executed).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from sophiavl_mcore.eval.samples import (
    EvalDataError,
    EvalSample,
    SkippedRow,
    image_format,
    infer_problem_type,
    log_read_result,
    read_records,
)

__all__ = ["REQUIRED_COLUMNS", "read_benchmark", "read_tsv", "read_xlsx"]

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("index", "question", "answer")
# Columns with a field of their own in EvalSample (the rest go to extras).
_KNOWN = frozenset({"index", "question", "answer", "hint", "image", "image_path", "category",
                    "l2-category", "l2_category", "split", "choices"})
_REFERENCE_MAX_CHARS = 64  # VLMEvalKit: an image cell this short names another row's index
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class _BadRow(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _raise_field_limit() -> None:
    """Let the csv module read cells as large as a base64 image."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def _cell(row: Mapping[str, str | None], column: str) -> str:
    value = row.get(column)
    text = "" if value is None else str(value).strip()
    return "" if text.lower() == "nan" else text


def _decode_image(text: str, field: str) -> bytes:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise _BadRow(field, f"not valid base64 ({err})") from None
    if image_format(data) is None:
        raise _BadRow(field, f"base64 decodes to {len(data)} bytes that are not a PNG/JPEG/GIF/BMP/WebP image")
    return data


class _Images:
    """Resolves image cells: decodes base64 once per row, follows index references."""

    def __init__(self, raw: Mapping[str, str]) -> None:
        self.raw = raw  # index -> image cell
        self.decoded: dict[str, tuple[bytes, ...]] = {}

    def _own(self, index: str) -> tuple[bytes, ...]:
        if index not in self.decoded:
            cell = self.raw[index]
            if cell.startswith("["):
                try:
                    items = ast.literal_eval(cell)
                except (ValueError, SyntaxError) as err:
                    raise _BadRow("image", f"starts with '[' but is not a list literal ({err})") from None
                if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                    raise _BadRow("image", "a list of images must hold base64 strings")
                self.decoded[index] = tuple(_decode_image(x, "image") for x in items)
            else:
                self.decoded[index] = (_decode_image(cell, "image"),)
        return self.decoded[index]

    def resolve(self, index: str) -> tuple[tuple[bytes, ...], str | None]:
        """(images, referenced index or None) of row ``index``."""
        cell = self.raw.get(index, "")
        if not cell:
            return (), None
        if len(cell) > _REFERENCE_MAX_CHARS:
            return self._own(index), None
        target = self.raw.get(cell, "")
        if not target or len(target) <= _REFERENCE_MAX_CHARS:
            raise _BadRow("image", f"refers to index {cell!r}, which has no image of its own")
        try:
            return self._own(cell), cell
        except _BadRow as err:
            raise _BadRow("image", f"refers to index {cell!r}, whose image is bad: {err.reason}") from None


def _options(row: Mapping[str, str | None], letters: Iterable[str]) -> dict[str, str]:
    options = {letter: _cell(row, letter) for letter in letters}
    options = {k: v for k, v in options.items() if v}
    choices = _cell(row, "choices")
    if not options and choices:
        try:
            items = ast.literal_eval(choices)
        except (ValueError, SyntaxError) as err:
            raise _BadRow("choices", f"not a list literal ({err})") from None
        if not isinstance(items, (list, tuple)) or len(items) > len(_LETTERS):
            raise _BadRow("choices", f"expected a list of at most {len(_LETTERS)} options")
        options = {_LETTERS[i]: str(item).strip() for i, item in enumerate(items)}
    return options


def _sample(row: Mapping[str, str | None], images: _Images, letters: list[str],
            source: str) -> EvalSample:
    index = _cell(row, "index")
    for column in REQUIRED_COLUMNS:
        if not _cell(row, column):
            raise _BadRow(column, "empty (a required field)")
    pictures, ref = images.resolve(index)
    options = _options(row, letters)
    answer = _cell(row, "answer")
    extras = {k: _cell(row, k) for k in row
              if k is not None and k not in _KNOWN and k not in letters and _cell(row, k)}
    return EvalSample(
        index=index, question=_cell(row, "question"), answer=answer, hint=_cell(row, "hint"),
        options=options, category=_cell(row, "category"),
        l2_category=_cell(row, "l2-category") or _cell(row, "l2_category"),
        split=_cell(row, "split"), images=pictures, image_path=_cell(row, "image_path") or None,
        image_ref=ref, problem_type=infer_problem_type(options, answer, extras), source=source,
        extras=extras,
    )


def _samples_from_rows(path: Path, header: list[str], rows: list[dict[str, str | None]]
                       ) -> tuple[list[EvalSample], list[SkippedRow]]:
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise EvalDataError(f"{path}: no column {', '.join(repr(c) for c in missing)}; "
                            f"a benchmark file needs {', '.join(REQUIRED_COLUMNS)} (it has {header})")
    letters = [c for c in _LETTERS if c in header]
    raw: dict[str, str] = {}
    for row in rows:
        raw.setdefault(_cell(row, "index"), _cell(row, "image"))
    images = _Images(raw)
    samples: list[EvalSample] = []
    skipped: list[SkippedRow] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        index = _cell(row, "index")
        where = f"{i} (index={index!r})"
        if None in row:  # csv.DictReader puts cells beyond the header under None
            skipped.append(SkippedRow(str(path), where, "row", f"{len(header) + len(row[None])} "
                                      f"cells for {len(header)} columns"))
            continue
        if index in seen:
            skipped.append(SkippedRow(str(path), where, "index", f"index {index!r} appears twice"))
            continue
        try:
            sample = _sample(row, images, letters, path.stem)
        except _BadRow as err:
            skipped.append(SkippedRow(str(path), where, err.field, err.reason))
            continue
        seen.add(index)
        samples.append(sample)
    log_read_result(path, samples, skipped)
    return samples, skipped


def read_tsv(path: str | Path) -> tuple[list[EvalSample], list[SkippedRow]]:
    """Samples of a VLMEvalKit TSV file and the rows skipped (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"benchmark file {path} does not exist")
    _raise_field_limit()
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = list(reader)
        header = [h.strip() for h in reader.fieldnames or []]
    if header != list(reader.fieldnames or []):
        rows = [{(k.strip() if k is not None else None): v for k, v in r.items()} for r in rows]
    return _samples_from_rows(path, header, rows)


def _xlsx_rows(path: Path) -> Iterator[list[object]]:
    try:
        import openpyxl
    except ImportError:
        raise EvalDataError(
            f"{path}: reading .xlsx needs openpyxl, which is not installed; install it "
            "(pip install openpyxl) or convert the file to VLMEvalKit's TSV") from None
    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        yield from book.active.iter_rows(values_only=True)
    finally:
        book.close()


def read_xlsx(path: str | Path) -> tuple[list[EvalSample], list[SkippedRow]]:
    """Samples of an XLSX file in the TSV's column layout (first sheet; needs openpyxl)."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"benchmark file {path} does not exist")
    lines = _xlsx_rows(path)
    header = [str(h).strip() if h is not None else "" for h in next(lines, [])]
    rows = [{h: ("" if v is None else str(v)) for h, v in zip(header, line, strict=False)}
            for line in lines]
    return _samples_from_rows(path, header, rows)


def read_benchmark(path: str | Path, image_root: str | Path | None = None
                   ) -> tuple[list[EvalSample], list[SkippedRow]]:
    """Read a benchmark file by its type: ``.tsv`` (VLMEvalKit), ``.xlsx``, or the
    project's records (``.json`` / ``.jsonl`` / ``.parquet``; images under ``image_root``,
    default the file's directory)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".tsv":
        return read_tsv(path)
    if suffix == ".xlsx":
        return read_xlsx(path)
    if suffix in (".json", ".jsonl", ".parquet"):
        return read_records(path, image_root)
    raise EvalDataError(f"{path}: unknown benchmark file type {suffix!r}; expected .tsv, .xlsx, "
                        ".json, .jsonl or .parquet")
