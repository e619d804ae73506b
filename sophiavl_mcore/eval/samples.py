"""One benchmark question (:class:`EvalSample`), the rows a reader skipped
(:class:`SkippedRow`), and the reader of the project's own record files.

Readers never stop on a bad row: they return ``(samples, skipped)``, each skipped row
with a one-line reason naming the file, the row and the field. Images stay encoded
(bytes, or a path) until :meth:`EvalSample.pil_image` decodes one, so reading a large
benchmark file is cheap.

:func:`read_records` reads the project's JSON / JSONL / parquet records
(:mod:`sophiavl_mcore.data.records`: the same per-record validation the trainer uses,
but a bad record is skipped instead of fatal).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sophiavl_mcore.data.errors import RecordError
from sophiavl_mcore.data.records import read_raw_records, validate_record
from sophiavl_mcore.rewards.numeric import parse_plain_number

__all__ = ["EvalDataError", "EvalSample", "SkippedRow", "infer_problem_type", "read_records"]

logger = logging.getLogger(__name__)

# Leading bytes of the image formats benchmark files carry.
_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF8", "gif"),
    (b"BM", "bmp"), (b"RIFF", "webp"),
)
_FIELD_RE = re.compile(r"field '([^']+)'")


class EvalDataError(ValueError):
    """A benchmark file that cannot be read at all (missing, unknown type, or without a
    required column); bad *rows* are skipped instead, see :class:`SkippedRow`."""


def image_format(data: bytes) -> str | None:
    """The file extension of an encoded image by its leading bytes (None: not an image)."""
    for magic, ext in _IMAGE_MAGIC:
        if data.startswith(magic):
            return ext
    return None


@dataclasses.dataclass(frozen=True)
class SkippedRow:
    """A row a reader left out: ``row`` is its position in the file (data rows from 0, or
    the record's location), ``field`` the column or field at fault."""

    file: str
    row: str
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: row {self.row}: field {self.field!r}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class EvalSample:
    """One benchmark question, whatever file it came from.

    ``options`` maps option letters to their texts, in letter order (empty: not multiple
    choice). ``images`` holds encoded images (PNG/JPEG/… bytes, already base64-decoded);
    ``image_path`` is a file path (project records) or the benchmark's own image name (the
    TSV ``image_path`` column, which MME groups questions by); ``image_ref`` is the index
    of the row whose image this row reuses (TSV image references), else None.
    ``problem_type`` is one of the project's problem types (``data.schema``), from the
    record or inferred (:func:`infer_problem_type`). ``extras`` keeps the other columns
    (MathVista's ``question_type``, ``answer_type``, ``precision``, ``skills``, ``task``, …)
    as strings.
    """

    index: str
    question: str
    answer: str
    hint: str = ""
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    category: str = ""
    l2_category: str = ""
    split: str = ""
    images: tuple[bytes, ...] = ()
    image_path: str | None = None
    image_ref: str | None = None
    problem_type: str = "free-form"
    source: str = ""
    extras: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return bool(self.images) or (self.image_path is not None and Path(self.image_path).is_file())

    @property
    def image_key(self) -> str:
        """What identifies this sample's image: the ``image_path`` column when present,
        else the index of the row that holds the image bytes (MME pairs questions by it)."""
        return self.image_path or self.image_ref or self.index

    def image_bytes(self, i: int = 0) -> bytes | None:
        """The ``i``-th encoded image (bytes in the sample, or read from ``image_path``)."""
        if self.images:
            return self.images[i]
        if i == 0 and self.image_path is not None and Path(self.image_path).is_file():
            return Path(self.image_path).read_bytes()
        return None

    def pil_image(self, i: int = 0) -> Any:
        """The ``i``-th image decoded to an RGB ``PIL.Image`` (None: the sample has none)."""
        data = self.image_bytes(i)
        if data is None:
            return None
        from PIL import Image  # decoding happens only here

        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")

    def write_image(self, directory: str | Path, i: int = 0) -> str | None:
        """A file path of the ``i``-th image, for loaders that read paths
        (``data.images.ImageLoader``): ``image_path`` itself when it is a file, else the
        bytes written once to ``directory/<index>[_i].<ext>``. None: no image."""
        if not self.images:
            path = self.image_path
            return path if i == 0 and path is not None and Path(path).is_file() else None
        data = self.images[i]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.index)
        name = f"{safe}_{i}" if i else safe
        path = Path(directory) / f"{name}.{image_format(data) or 'img'}"
        if not (path.is_file() and path.stat().st_size == len(data)):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return str(path)

    def option_list(self) -> tuple[str, ...]:
        """The options as ``"A. text"`` lines in letter order (the form the project's
        prompts and ``rewards.outcome.option_letters`` read their labels from)."""
        return tuple(f"{letter}. {text}" for letter, text in self.options.items())


def infer_problem_type(options: Mapping[str, str], answer: str, extras: Mapping[str, str]) -> str:
    """The project problem type of a benchmark row: options (or a MathVista
    ``question_type`` of ``multi_choice``) → multiple choice; an ``answer_type`` of
    integer/float, or an answer that is a plain number → numerical; else free-form."""
    if options or extras.get("question_type", "").replace("-", "_") in ("multi_choice", "multiple_choice"):
        return "multiple choice"
    if extras.get("answer_type") in ("integer", "float") or parse_plain_number(answer) is not None:
        return "numerical"
    return "free-form"


def _sample_from_record(rec: Any, where: str, root: Path, source: str) -> EvalSample:
    record = validate_record(rec, where, root, source)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    options = {letters[i]: text for i, text in enumerate(record.options[: len(letters)])}
    extras = {k: str(v) for k, v in rec.items()
              if k not in ("problem_id", "problem", "options", "solution", "path", "data_type")
              and isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    return EvalSample(
        index=record.problem_id, question=record.problem, answer=record.answer,
        options=options, category=record.data_source, image_path=record.image_path,
        problem_type=record.problem_type, source=source, extras=extras,
    )


def read_records(path: str | Path, image_root: str | Path | None = None
                 ) -> tuple[list[EvalSample], list[SkippedRow]]:
    """Samples of a project record file (.json / .jsonl / .parquet); a record that fails
    the schema of ``data.records`` is skipped with the loader's message. A file that
    cannot be parsed at all raises :class:`EvalDataError`."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"benchmark file {path} does not exist")
    root = Path(image_root) if image_root else path.parent
    samples: list[EvalSample] = []
    skipped: list[SkippedRow] = []
    seen: set[str] = set()
    try:
        for where, rec in read_raw_records(path):
            row = where.removeprefix(str(path)).lstrip(": ")
            try:
                sample = _sample_from_record(rec, where, root, path.stem)
            except RecordError as err:
                message = str(err).removeprefix(str(path)).lstrip(":")
                named = _FIELD_RE.search(message.split(": ", 1)[-1])
                skipped.append(SkippedRow(str(path), row, named[1] if named else "record", message))
                continue
            if sample.index in seen:
                skipped.append(SkippedRow(str(path), row, "problem_id",
                                          f"problem_id {sample.index!r} appears twice"))
                continue
            seen.add(sample.index)
            samples.append(sample)
    except RecordError as err:  # the file itself (not valid JSON, not UTF-8)
        raise EvalDataError(str(err)) from err
    log_read_result(path, samples, skipped)
    return samples, skipped


def log_read_result(path: Path, samples: list[EvalSample], skipped: list[SkippedRow]) -> None:
    logger.info("read %d samples from %s (%d rows skipped)", len(samples), path, len(skipped))
    for row in skipped:
        logger.warning("skipped %s", row)
