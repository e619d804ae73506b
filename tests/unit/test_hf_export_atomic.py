"""A crash in the middle of an HF export leaves no half-written export behind.

Three ways in, one atomic write (:mod:`sophiavl_mcore.atomic`):
``convert_mcore_to_hf`` (the tools' converter), ``export_hf`` of a training checkpoint, and
``export_hf`` of the live model (its Megatron shards dir too). The export is cut in two
ways:

(a) an exception while the 2nd safetensors file is being written (the writer
    monkeypatched): no export dir and no temp dir when there was none before; the
    previous complete export intact (same bytes, checksums verify, loads) when there was;
(b) the exporting process SIGKILLed after its first file (the writer monkeypatched inside
    the child): the target absent or the previous complete export; the next export
    removes the killed one's temp dir.

The previous export is made from other weights, so that a partial overwrite (the old
in-place export) changes bytes the check compares.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sophiavl_mcore.checkpoint import StreamingWriter, convert_hf_to_mcore, rank_file, read_meta
from sophiavl_mcore.checkpoint import convert as convert_module
from sophiavl_mcore.checkpoint.convert import convert_mcore_to_hf
from sophiavl_mcore.checkpoint.hf import export_hf
from sophiavl_mcore.checkpoint.manifest import CHECKSUMS, verify_dir
from sophiavl_mcore.checkpoint.training import CheckpointManager
from sophiavl_mcore.testing.multiproc import kill_when_ready
from tests.unit.test_checkpoint_safety_issue17 import NamedTensors, _tiny_module

SHARD = 1  # bytes: one HF safetensors file per conversion rule, so an export has several
SOURCES = ("convert", "checkpoint", "live")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = _tiny_module().write_tiny_qwen2(tmp_path_factory.mktemp("hf"))
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')  # a serving file
    return path


def _model(mc: Path, shift: float) -> NamedTensors:
    """The tiny Qwen2's Megatron tensors, every weight moved by ``shift``."""
    return NamedTensors({k: v + shift for k, v in load_file(rank_file(mc, 0, 0)).items()})


@pytest.fixture()
def case(hf_dir, tmp_path) -> dict:
    """Two policies (old: weights + 1, new: the original) as checkpoints and live models."""
    mc = convert_hf_to_mcore(hf_dir, tmp_path / "mc", 1, 1, progress=False)
    meta = read_meta(mc)
    out = {"hf_dir": hf_dir, "meta": meta, "out": tmp_path / "export" / "hf",
           "mcore": tmp_path / "export" / "mcore"}
    for name, shift in (("old", 1.0), ("new", 0.0)):
        out[f"{name}_model"] = _model(mc, shift)
        out[f"{name}_ckpt"] = CheckpointManager(tmp_path / f"ck_{name}", model_meta=meta).save(
            1, out[f"{name}_model"])
    return out


def _export(source: str, case: dict, which: str) -> Path:
    """Export the ``which`` (old / new) policy through ``source``."""
    if source == "convert":
        return convert_mcore_to_hf(case[f"{which}_ckpt"], case["out"], max_shard_bytes=SHARD,
                                   progress=False, serving_files_from=case["hf_dir"])
    src = case[f"{which}_model"] if source == "live" else case[f"{which}_ckpt"]
    return export_hf(src, case["out"], source_hf_dir=case["hf_dir"], model_meta=case["meta"],
                     mcore_dir=case["mcore"], max_shard_bytes=SHARD)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _assert_complete(directory: Path, expected: dict[str, bytes] | None = None) -> None:
    """A complete export: checksums verify, every weight file loads, serving file copied
    once (and, given ``expected``, exactly those bytes)."""
    verify_dir(directory, require=True)
    files = _snapshot(directory)
    assert CHECKSUMS in files
    if (directory / "config.json").is_file() and not (directory / "mcore_checkpoint.json").is_file():
        assert "tokenizer_config.json" in files
        weights = [n for n in files if n.endswith(".safetensors")]
        assert len(weights) > 2, weights  # the fault below hits a file in the middle
        for name in weights:
            load_file(directory / name)
    if expected is not None:
        assert files.keys() == expected.keys()
        differ = [n for n in files if files[n] != expected[n]]
        assert not differ, f"{directory}: changed by the failed export: {differ}"


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ (a) an exception


class _FailingWriter(StreamingWriter):
    """Raises while writing the 2nd HF safetensors file (sharded names ``model-0000N-``)."""

    def write(self, name, tensor) -> None:
        if self.path.name.startswith("model-00002-of-"):
            raise OSError(28, "injected: No space left on device")
        super().write(name, tensor)


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "previous"])
@pytest.mark.parametrize("source", SOURCES)
def test_exception_mid_export_leaves_no_half_written_dir(case, monkeypatch, source, previous):
    before = {}
    if previous:
        _assert_complete(_export(source, case, "old"))
        before = {d: _snapshot(case[d]) for d in ("out", "mcore") if case[d].exists()}
    monkeypatch.setattr(convert_module, "StreamingWriter", _FailingWriter)
    with pytest.raises(Exception, match="injected") as err:
        _export(source, case, "new")
    assert err.type in (OSError, convert_module.CheckpointError), err.value

    if previous:
        _assert_complete(case["out"], before["out"])
    else:
        assert not case["out"].exists(), sorted(p.name for p in case["out"].rglob("*"))
    if source == "live":  # the shards dir was complete before the HF part failed
        _assert_complete(case["mcore"])
    assert _leftovers(case["out"].parent) == []  # no temp (or set-aside) dir either

    monkeypatch.undo()
    _assert_complete(_export(source, case, "new"))


# ------------------------------------------------------------------ (b) SIGKILL


def _child_export(source: str, case: dict, ready: str) -> None:
    """Runs the export; the writer pauses the process after its first file is complete
    (for ``live`` that is the Megatron shard, else the first HF file)."""

    class PausingWriter(StreamingWriter):
        def close(self) -> None:
            super().close()
            Path(ready).write_text(str(self.path))
            time.sleep(600)  # the parent SIGKILLs us here, half-way through the export

    convert_module.StreamingWriter = PausingWriter
    _export(source, case, "new")


@pytest.mark.parametrize("source, previous", [("checkpoint", False), ("checkpoint", True),
                                              ("live", True)])
def test_sigkill_mid_export_keeps_old_or_nothing_and_next_export_cleans(case, tmp_path, source,
                                                                        previous):
    before = {}
    if previous:
        _export(source, case, "old")
        before = {d: _snapshot(case[d]) for d in ("out", "mcore") if case[d].exists()}
    ready = tmp_path / "ready"
    child_case = {k: v for k, v in case.items() if not k.endswith("_model")}
    if source == "live":  # the child rebuilds the live model from the same tensors
        child_case["new_model"] = case["new_model"]
    written = kill_when_ready(_child_export, (source, child_case, str(ready)), ready)
    stale = [p for p in written.parents if p.name.startswith(".") and ".tmp-" in p.name]
    assert stale and stale[0].exists(), written  # killed mid-write, in a temp dir

    for d in ("out", "mcore"):
        if d in before:
            _assert_complete(case[d], before[d])
        else:
            assert not case[d].exists(), d
    assert _leftovers(case["out"].parent) == [stale[0].name]

    _assert_complete(_export(source, case, "new"))
    assert _leftovers(case["out"].parent) == []  # the killed export's temp dir is gone
