"""Streaming safetensors I/O: lazy multi-file reads, pre-planned incremental writes.

:class:`StreamingWriter` writes one safetensors file whose tensor names, dtypes and
shapes are known in advance (the conversion plan knows them): the header goes first,
then each tensor's bytes are written at its offset whenever it is ready, so a shard
never has to be held in memory. The result is a standard safetensors file.

:class:`HFReader` opens a checkpoint directory (``model.safetensors`` or
``model.safetensors.index.json`` + shards) and reads tensors one at a time through
``safe_open``; headers are checked up front so that a missing shard or tensor, or a
shape that disagrees with config.json, fails before any large allocation. Every file is
opened through :func:`open_safetensors`, so a truncated file is an error naming it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

_DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
if hasattr(torch, "float8_e4m3fn"):
    _DTYPE_CODES[torch.float8_e4m3fn] = "F8_E4M3"
    _DTYPE_CODES[torch.float8_e5m2] = "F8_E5M2"
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read/converted (names the file and the tensor)."""


def open_safetensors(path: str | Path) -> Any:
    """``safe_open`` of one file; a missing, truncated or otherwise unreadable file raises
    :class:`CheckpointError` naming it (safetensors' own errors do not)."""
    path = Path(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        size = path.stat().st_size if path.is_file() else None
        what = "is missing" if size is None else f"({size} bytes) is not a complete safetensors file"
        raise CheckpointError(f"{path} {what}: {err}") from err


def dtype_from_code(code: str) -> torch.dtype:
    if code not in _CODE_DTYPES:
        raise CheckpointError(f"unsupported safetensors dtype {code!r}")
    return _CODE_DTYPES[code]


def _nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in any order, header first.

    Args:
        path: output file.
        specs: ``{name: (dtype, shape)}`` of every tensor the file will hold.
        metadata: optional string→string metadata stored in the header.
    """

    def __init__(
        self,
        path: str | Path,
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        self._offsets: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        # Offsets follow the caller's order: writing in that order is a sequential append.
        for name in specs:
            dtype, shape = specs[name]
            n = _nbytes(dtype, shape)
            header[name] = {
                "dtype": _DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            self._offsets[name] = (offset, n, dtype, tuple(shape))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors does
        self._data_start = 8 + len(raw)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._end = self._data_start + offset
        self._pending = set(specs)

    def write(self, name: str, tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """Write ``tensor`` (planned dtype and shape exactly), or a list of pieces whose
        concatenation along dim 0 is that tensor (saves the copy of a ``torch.cat``)."""
        if name not in self._offsets:
            raise CheckpointError(f"{self.path}: tensor {name} was not planned for this file")
        offset, n, dtype, shape = self._offsets[name]
        pieces = tensor if isinstance(tensor, list) else [tensor]
        rows = sum(p.shape[0] if p.dim() else 1 for p in pieces)
        got = (rows, *pieces[0].shape[1:]) if pieces[0].dim() else ()
        if any(p.dtype != dtype for p in pieces) or tuple(got) != shape:
            raise CheckpointError(
                f"{self.path}: tensor {name} is {pieces[0].dtype} {tuple(got)}, "
                f"planned {dtype} {shape}"
            )
        pos = self._data_start + offset
        if self._f.tell() != pos:
            self._f.seek(pos)
        for p in pieces:
            data = p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._f.write(memoryview(data))
        self._pending.discard(name)

    def close(self) -> None:
        if not self._f.closed and self._f.seek(0, 2) < self._end:
            self._f.truncate(self._end)
        self._f.close()
        if self._pending:
            missing = sorted(self._pending)[:5]
            os.unlink(self.path)
            raise CheckpointError(
                f"{self.path}: {len(self._pending)} planned tensor(s) never written, e.g. {missing}"
            )

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._f.close()


class LazyTensorFiles:
    """Lazy access to tensors spread over several safetensors files (one open at a time
    per file, kept open for the reader's lifetime)."""

    def __init__(self, where: dict[str, Path]) -> None:
        self.where = where
        self._handles: dict[Path, object] = {}
        self._headers: dict[str, tuple[str, tuple[int, ...]]] = {}

    def _handle(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise CheckpointError(f"shard file {path} is missing")
            self._handles[path] = open_safetensors(path)
        return self._handles[path]

    def names(self) -> list[str]:
        return list(self.where)

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(dtype code, shape) from the header only."""
        if name not in self._headers:
            if name not in self.where:
                raise CheckpointError(f"tensor {name} is not in the checkpoint")
            sl = self._handle(self.where[name]).get_slice(name)
            self._headers[name] = (sl.get_dtype(), tuple(sl.get_shape()))
        return self._headers[name]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"tensor {name} is not in the checkpoint")
        return self._handle(self.where[name]).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def open_hf_dir(ckpt_dir: str | Path) -> LazyTensorFiles:
    """Index an HF checkpoint dir; every referenced shard must exist (checked here)."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    single = ckpt_dir / "model.safetensors"
    where: dict[str, Path] = {}
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' mapping")
        missing = sorted({f for f in weight_map.values() if not (ckpt_dir / f).is_file()})
        if missing:
            raise CheckpointError(
                f"{index} references shard file(s) that do not exist: {missing} in {ckpt_dir}"
            )
        where = {k: ckpt_dir / v for k, v in weight_map.items()}
    elif single.is_file():
        with open_safetensors(single) as f:
            where = {k: single for k in f.keys()}
    else:
        raise CheckpointError(
            f"{ckpt_dir}: neither model.safetensors nor model.safetensors.index.json exists"
        )
    return LazyTensorFiles(where)
