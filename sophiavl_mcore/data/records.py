"""SophiaVL-R1 records: schema, loaders (JSON / JSONL / parquet), weighted mixing and a
resumable, deterministic sampler.

A record (one training question) has the fields of the SophiaVL-R1 release::

    problem_id    int | str      unique within its file (used in error messages)
    problem       str            the question text
    data_type     "image" | "text"
    problem_type  one of rewards.outcome.PROBLEM_TYPES, or "text" (the release's name
                  for free-text answers, read as "free-form")
    options       list[str]      option texts for multiple choice (may be empty)
    solution      str            "<answer>X</answer>"
    path          str            image path relative to the source's image root
                                 (required for data_type "image", ignored for "text")
    data_source   str            optional; defaults to the source's name

Schema problems raise :class:`RecordError` at load time (an unknown problem_type raises
its subclass ``ProblemTypeError``), naming the file, the record (JSONL line or JSON/parquet
index, and problem_id) and the field, with what was expected. Files are UTF-8, with or
without a byte-order mark. Image problems are not
checked here: they are found when the image is loaded (see ``images.py``), where a bad
image skips its sample instead of stopping the run.

Mixing: one epoch has ``epoch_size`` samples (default: the sum of the sources' sizes);
source ``i`` contributes ``round(epoch_size · w_i / Σw)`` of them (largest remainder),
drawn without replacement from fresh permutations of the source (a source smaller than
its share is cycled, a larger one is subsampled differently each epoch), then all are
interleaved by one shuffle. Everything is a function of ``(seed, epoch)`` only, so the
position ``(epoch, index)`` is the whole state of the sampler.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from sophiavl_mcore.data.config import DataConfig
from sophiavl_mcore.data.errors import RecordError
from sophiavl_mcore.data.schema import check_problem_type

__all__ = ["DATA_TYPES", "MixedSampler", "Record", "RecordError",
           "build_sampler", "check_unique_ids", "load_records", "read_raw_records",
           "validate_record"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
DATA_TYPES: tuple[str, ...] = ("image", "text")


@dataclasses.dataclass(frozen=True)
class Record:
    """One validated question. ``image_path`` is absolute (None for text-only records)."""

    problem_id: str
    problem: str
    data_type: str
    problem_type: str
    options: tuple[str, ...]
    solution: str
    answer: str  # the text inside <answer></answer> of ``solution``
    image_path: str | None
    data_source: str

    @property
    def has_image(self) -> bool:
        return self.image_path is not None


# ------------------------------------------------------------------ validation


def _expect_str(rec: Mapping[str, Any], field: str, where: str, *, required: bool = True) -> str | None:
    value = rec.get(field)
    if value is None and not required:
        return None
    if field not in rec and required:
        raise RecordError(f"{where}: missing field {field!r} (expected a string)")
    if not isinstance(value, str):
        raise RecordError(
            f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r:.80}"
        )
    return value


def validate_record(
    rec: Any, where: str, image_root: Path, default_source: str
) -> Record:
    """Check one raw record against the schema and return it as a :class:`Record`.

    ``where`` names the file and record index; the problem_id is appended once known.
    """
    if not isinstance(rec, Mapping):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    pid = rec.get("problem_id")
    if "problem_id" not in rec:
        raise RecordError(f"{where}: missing field 'problem_id' (expected an int or a string)")
    if isinstance(pid, bool) or not isinstance(pid, (int, str)):
        raise RecordError(
            f"{where}: field 'problem_id' must be an int or a string, got {type(pid).__name__} {pid!r:.80}"
        )
    where = f"{where} (problem_id={pid!r})"
    problem = _expect_str(rec, "problem", where)
    data_type = _expect_str(rec, "data_type", where)
    if data_type not in DATA_TYPES:
        raise RecordError(f"{where}: field 'data_type' is {data_type!r}; expected one of {DATA_TYPES}")
    problem_type = check_problem_type(rec.get("problem_type"), where)
    options = rec.get("options", [])
    if options is None:
        options = []
    if isinstance(options, np.ndarray):  # parquet list columns may arrive as arrays
        options = options.tolist()
    if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
        raise RecordError(f"{where}: field 'options' must be a list of strings, got {options!r:.120}")
    solution = _expect_str(rec, "solution", where)
    match = _ANSWER_RE.search(solution)
    if match is None:
        raise RecordError(
            f"{where}: field 'solution' must contain <answer>...</answer>, got {solution!r:.120}"
        )
    image_path = None
    if data_type == "image":
        rel = _expect_str(rec, "path", where)
        if not rel:
            raise RecordError(f"{where}: field 'path' is empty but data_type is 'image'")
        image_path = str(image_root / rel)
    source = _expect_str(rec, "data_source", where, required=False) or default_source
    return Record(
        problem_id=str(pid),
        problem=problem,
        data_type=data_type,
        problem_type=problem_type,
        options=tuple(options),
        solution=solution,
        answer=match.group(1).strip(),
        image_path=image_path,
        data_source=source,
    )


# ------------------------------------------------------------------ loaders


_BOM = b"\xef\xbb\xbf"


def _decode(raw: bytes, path: Path, lineno: int | None = None, *, bom: bool = True) -> str:
    """UTF-8 text of ``raw`` (a whole file, or line ``lineno``), a leading byte-order mark
    dropped when ``bom``; bytes that are not UTF-8 raise :class:`RecordError` naming the
    file, the line and the column of the first bad byte."""
    if bom and raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        if lineno is None:
            lineno = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise RecordError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); "
            "expected UTF-8 text"
        ) from None


def read_raw_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, raw_record)`` from a .json / .jsonl / .parquet file.

    JSON files are read as UTF-8 with an optional byte-order mark (as written by common
    Windows tools); bytes that are not UTF-8 raise :class:`RecordError` naming the line.
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                # Only the file's first line may carry a byte-order mark.
                line = _decode(raw, path, lineno, bom=lineno == 1)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise RecordError(f"{path}:{lineno}: not valid JSON ({err})") from err
                yield f"{path}:{lineno}", rec
    elif suffix == ".json":
        text = _decode(path.read_bytes(), path, None)
        try:
            for i, (lineno, rec) in enumerate(_json_list_items(text, path)):
                yield f"{path}:{lineno} record #{i}", rec
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}:{err.lineno}: not valid JSON ({err})") from err
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row #{i}", rec
    else:
        raise RecordError(f"{path}: unknown data file type {suffix!r}; expected .json, .jsonl or .parquet")


_JSON_WS = re.compile(r"[ \t\n\r]*")


def _json_list_items(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """``(line, value)`` of each element of a top-level JSON list (the line where the
    element starts, so that errors can point at it)."""
    decoder = json.JSONDecoder()
    pos = _JSON_WS.match(text, 0).end()
    if not text.startswith("[", pos):
        kind = type(json.loads(text)).__name__  # raises JSONDecodeError if not JSON at all
        raise RecordError(f"{path}: top level must be a list of records, got {kind}")
    pos = _JSON_WS.match(text, pos + 1).end()
    if not text.startswith("]", pos):
        while True:
            value, end = decoder.raw_decode(text, pos)
            yield text.count("\n", 0, pos) + 1, value
            pos = _JSON_WS.match(text, end).end()
            if text.startswith("]", pos):
                break
            if not text.startswith(",", pos):
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
            pos = _JSON_WS.match(text, pos + 1).end()
    rest = _JSON_WS.match(text, pos + 1).end()
    if rest < len(text):
        raise json.JSONDecodeError("extra data after the list", text, rest)


def check_unique_ids(path: Path, entries: Sequence[tuple[str, Any]]) -> None:
    """Raise :class:`RecordError` if two records share a problem_id.

    ``entries`` are ``(where, raw problem_id)``. Ids are compared as strings (the
    trainer keys records by ``str(problem_id)``), so ``7`` and ``"7"`` are the same id;
    the error says so when that is the collision.
    """
    seen: dict[str, tuple[str, Any]] = {}
    for where, pid in entries:
        key = str(pid)
        if key in seen:
            first_where, first_pid = seen[key]
            same = "" if type(first_pid) is type(pid) else (
                f" ({first_pid!r} and {pid!r} count as the same id: ids are compared as strings)")
            raise RecordError(
                f"{path}: problem_id {pid!r} appears twice, at {first_where} and at {where}{same}; "
                "expected unique ids"
            )
        seen[key] = (where, pid)


def load_records(path: str | Path, image_root: str | Path | None = None, name: str = "") -> list[Record]:
    """Load and validate every record of one file; raise :class:`RecordError` on the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"data file {path} does not exist")
    root = Path(image_root) if image_root else path.parent
    source = name or path.stem
    records, ids = [], []
    for where, rec in read_raw_records(path):
        records.append(validate_record(rec, where, root, source))
        ids.append((where, rec["problem_id"]))
    check_unique_ids(path, ids)
    if not records:
        raise RecordError(f"{path}: no records")
    logger.info("loaded %d records from %s", len(records), path)
    return records


# ------------------------------------------------------------------ mixing + sampler


def _shares(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` by ``weights`` into integers (largest remainder, ties to lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:remainder]] += 1
    return counts.tolist()


class MixedSampler(Generic[T]):
    """Deterministic, resumable order over several record lists mixed by weight.

    The items may be any records (GRPO's :class:`Record`, ``trm_train``'s thinking
    records, plain indices); one source without weights is a plain epoch order: each
    epoch visits every item once (``shuffle=False``: in file order, which a curriculum
    relies on).

    ``next_batch(n)`` returns the next ``n`` records, crossing epoch boundaries.
    ``state_dict()`` is the position; a sampler given it via ``load_state_dict`` (and the
    same sources, weights, seed) continues with exactly the records the first would
    have produced.
    """

    def __init__(
        self,
        sources: Sequence[Sequence[T]],
        weights: Sequence[float] | None = None,
        seed: int = 1234,
        epoch_size: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not sources or any(len(s) == 0 for s in sources):
            raise ValueError(f"every source needs records; sizes {[len(s) for s in sources]}")
        weights = list(weights) if weights is not None else [float(len(s)) for s in sources]
        if len(weights) != len(sources) or any(not (w > 0) for w in weights):
            raise ValueError(f"need one weight > 0 per source; got {weights} for {len(sources)} sources")
        self.sources = [list(s) for s in sources]
        self.weights = weights
        self.seed = seed
        self.shuffle = shuffle
        self.epoch_size = epoch_size or sum(len(s) for s in sources)
        self.epoch = 0
        self.index = 0
        self._order: np.ndarray | None = None  # [epoch_size, 2]: (source, record index)

    # -- order ---------------------------------------------------------------

    def _source_indices(self, src: int, count: int) -> np.ndarray:
        size = len(self.sources[src])
        if not self.shuffle:
            return np.arange(count) % size
        chunks, taken, rnd = [], 0, 0
        while taken < count:
            rng = np.random.default_rng([self.seed, self.epoch, src, rnd])
            perm = rng.permutation(size)
            chunks.append(perm[: count - taken])
            taken += len(chunks[-1])
            rnd += 1
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)

    def epoch_order(self) -> np.ndarray:
        """``[epoch_size, 2]`` int64 (source, index) pairs of the current epoch."""
        if self._order is None:
            parts = []
            for src, count in enumerate(_shares(self.epoch_size, self.weights)):
                idx = self._source_indices(src, count)
                parts.append(np.stack([np.full(len(idx), src), idx], axis=1))
            order = np.concatenate(parts).astype(np.int64)
            if self.shuffle:
                order = order[np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
            self._order = order
        return self._order

    # -- iteration -----------------------------------------------------------

    def next_batch(self, n: int) -> list[T]:
        """The next ``n`` records (the epoch advances when it runs out)."""
        out: list[T] = []
        while len(out) < n:
            order = self.epoch_order()
            take = order[self.index : self.index + (n - len(out))]
            out.extend(self.sources[s][i] for s, i in take)
            self.index += len(take)
            if self.index >= len(order):
                self.epoch += 1
                self.index = 0
                self._order = None
        return out

    def __iter__(self) -> Iterator[T]:
        while True:
            yield self.next_batch(1)[0]

    # -- resume --------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "sizes": [len(s) for s in self.sources],
            "weights": [float(w) for w in self.weights],
            "seed": self.seed,
            "epoch_size": self.epoch_size,
            "shuffle": self.shuffle,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, **self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``'s position; sources/weights/seed must match those saved."""
        mine = self._fingerprint()
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            diff = {k: (theirs[k], mine[k]) for k in mine if theirs[k] != mine[k]}
            raise ValueError(f"sampler state does not match this data (saved vs now): {diff}")
        if not (0 <= int(state["index"]) < self.epoch_size) or int(state["epoch"]) < 0:
            raise ValueError(
                f"sampler state position epoch={state['epoch']} index={state['index']} is outside "
                f"0 <= index < {self.epoch_size}"
            )
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._order = None


def build_sampler(cfg: DataConfig) -> MixedSampler[Record]:
    """Load every configured source and mix them."""
    if not cfg.sources:
        raise ValueError("data.sources is empty: name at least one .json/.jsonl/.parquet file")
    lists = [
        load_records(s.path, s.image_root or None, s.name) for s in cfg.sources
    ]
    return MixedSampler(
        lists, [s.weight for s in cfg.sources], seed=cfg.seed, epoch_size=cfg.epoch_size,
        shuffle=cfg.shuffle,
    )
