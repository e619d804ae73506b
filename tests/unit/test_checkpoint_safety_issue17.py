"""Issue 17: checkpoints from untrusted places, on one CPU process.

- Module extra states never reach a module's ``set_extra_state`` as checkpoint bytes.
  ``TELikeLinear`` below stores and restores its state exactly as Transformer Engine's
  layers do (``pickle.dumps`` into a uint8 tensor / ``pickle.loads`` of any tensor it
  is given). Before the fix, ``CheckpointManager.load`` passed the saved tensor straight
  to ``load_state_dict``, so a crafted checkpoint ran code at resume (the control in
  ``test_crafted_extra_state_is_refused_not_run`` shows that path running the payload).
- Exports and conversions check the manifest first; before the fix a flipped byte in a
  shard or a same-size edit of ``mcore_checkpoint.json`` went straight into the export.
- The HF export carries ``checksums.json`` (before: no checksums at all).
- Truncated ``.safetensors`` errors name the file (before: safetensors' "incomplete
  metadata, file not fully covered" without a file name).
- A model padded to another vocabulary size fails naming the tensor and both shapes
  (before: a bare torch size error from ``copy_``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sophiavl_mcore.checkpoint import (
    CheckpointError,
    convert_hf_to_mcore,
    convert_mcore_to_hf,
    load_hf_into_model,
    read_meta,
)
from sophiavl_mcore.checkpoint.convert import copy_shard_into, rank_file
from sophiavl_mcore.checkpoint.extra_state import UnsafeExtraStateError
from sophiavl_mcore.checkpoint.hf import export_hf
from sophiavl_mcore.checkpoint.manifest import CHECKSUMS, COMPLETE, MANIFEST, CheckpointCorruptError
from sophiavl_mcore.checkpoint.training import CheckpointManager

# ------------------------------------------------------------------ extra states


class TELikeLinear(torch.nn.Linear):
    """A linear layer whose extra state behaves like Transformer Engine's (TE 2.x
    ``TransformerEngineBaseModule.get_extra_state`` / ``set_extra_state``)."""

    def __init__(self, n: int) -> None:
        super().__init__(n, n)
        self.fp8_meta = {"scale_fwd": torch.ones(3), "amax_history": torch.zeros(4, 3),
                         "extra_fp8_variables": {"num_gemms": 1, "fp8_max_fwd": 448.0}}

    def get_extra_state(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(pickle.dumps(self.fp8_meta)), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        if state.numel() == 0:
            return
        self.fp8_meta = pickle.loads(state.detach().cpu().numpy().tobytes())


class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_tensor(marker: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps({"scale_fwd": _Payload(marker)})),
                            dtype=torch.uint8)


def _reseal(ckpt: Path, rel: str) -> None:
    """Rewrite the manifest entry of ``rel`` and COMPLETE, as an attacker who controls the
    whole directory can: integrity checks alone do not stop a crafted checkpoint."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    data = (ckpt / rel).read_bytes()
    manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=1))
    digest = hashlib.sha256((ckpt / MANIFEST).read_bytes()).hexdigest()
    (ckpt / COMPLETE).write_text(json.dumps({"step": manifest["step"], "manifest_sha256": digest}))


def _te_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(TELikeLinear(4), torch.nn.ReLU(), TELikeLinear(4))


def test_te_like_extra_state_round_trips(tmp_path):
    model = _te_model()
    model[0].fp8_meta["scale_fwd"] = torch.tensor([0.5, 2.0, 8.0])
    model[2].fp8_meta["extra_fp8_variables"]["num_gemms"] = 3
    CheckpointManager(tmp_path / "ck").save(1, model)
    fresh = _te_model()
    CheckpointManager(tmp_path / "ck").load_latest(fresh)
    assert torch.equal(fresh[0].fp8_meta["scale_fwd"], torch.tensor([0.5, 2.0, 8.0]))
    assert fresh[2].fp8_meta["extra_fp8_variables"] == {"num_gemms": 3, "fp8_max_fwd": 448.0}
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_crafted_extra_state_is_refused_not_run(tmp_path):
    model = _te_model()
    CheckpointManager(tmp_path / "ck").save(1, model)
    ckpt = tmp_path / "ck" / "step_00000001"
    rel = "rank_state/tp00_pp000_dp000.pt"
    state = torch.load(ckpt / rel, weights_only=True)
    marker = tmp_path / "payload_ran"
    state["model_extra_state"]["model"]["2._extra_state"] = _crafted_tensor(marker)
    torch.save(state, ckpt / rel)
    _reseal(ckpt, rel)

    with pytest.raises(UnsafeExtraStateError) as err:
        CheckpointManager(tmp_path / "ck").load_latest(_te_model())
    msg = str(err.value)
    assert "'2._extra_state'" in msg and "posix.system" in msg and rel in msg, msg
    assert not marker.exists()

    # Control: the payload and the module are real — the pre-fix path (the saved tensor
    # handed to load_state_dict) runs the code.
    control = tmp_path / "control_ran"
    _te_model().load_state_dict({"2._extra_state": _crafted_tensor(control)}, strict=False)
    assert control.exists()


@pytest.mark.parametrize("payload, refused", [
    (pickle.dumps({"value": __import__("fractions").Fraction(1, 3)}), "fractions.Fraction"),
    (b"cos\nsystem\n(S'true'\ntR.", "os.system"),  # protocol 0 (TE unpickles any tensor)
    (b"not a pickle at all", "load"),
])
def test_other_extra_states_are_refused_naming_the_tensor(tmp_path, payload, refused):
    model = _te_model()
    CheckpointManager(tmp_path / "ck").save(1, model)
    ckpt, rel = tmp_path / "ck" / "step_00000001", "rank_state/tp00_pp000_dp000.pt"
    state = torch.load(ckpt / rel, weights_only=True)
    state["model_extra_state"]["model"]["0._extra_state"] = torch.frombuffer(
        bytearray(payload), dtype=torch.uint8)
    torch.save(state, ckpt / rel)
    _reseal(ckpt, rel)
    with pytest.raises(UnsafeExtraStateError, match=rf"'0\._extra_state'.*{refused}"):
        CheckpointManager(tmp_path / "ck").load_latest(_te_model())


# ------------------------------------------------------------------ exports and conversions


def _tiny_module():
    spec = importlib.util.spec_from_file_location(
        "_tiny", Path(__file__).parents[1] / "dist" / "_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NamedTensors(torch.nn.Module):
    """A plain module whose parameters carry dotted Megatron names (the state a
    single-rank Qwen2 GPTModel has), filled from a shard file."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            *path, leaf = name.split(".")
            mod: torch.nn.Module = self
            for part in path:
                if not hasattr(mod, part):
                    mod.add_module(part, torch.nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return _tiny_module().write_tiny_qwen2(tmp_path_factory.mktemp("hf"))


@pytest.fixture()
def training_ckpt(hf_dir, tmp_path) -> Path:
    """A complete training checkpoint (with conversion meta) of the tiny Qwen2."""
    mc = convert_hf_to_mcore(hf_dir, tmp_path / "mc", 1, 1, progress=False)
    model = NamedTensors(load_file(rank_file(mc, 0, 0)))
    return CheckpointManager(tmp_path / "ck", model_meta=read_meta(mc)).save(3, model)


def _flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_export_round_trip_and_checksums(hf_dir, training_ckpt, tmp_path):
    out = export_hf(training_ckpt, tmp_path / "hf_out", source_hf_dir=hf_dir)
    original, exported = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(exported) <= set(original)
    assert all(torch.equal(exported[k], original[k]) for k in exported)
    listed = json.loads((out / CHECKSUMS).read_text())["files"]
    on_disk = sorted(p.name for p in out.iterdir() if p.name != CHECKSUMS)
    assert sorted(listed) == on_disk and "config.json" in listed
    for name, entry in listed.items():  # recomputed here, not by the code under test
        data = (out / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    # A later conversion checks them: one flipped byte stops it, naming the file.
    _flip_byte(out / "model.safetensors")
    with pytest.raises(CheckpointCorruptError, match=r"hf_out/model\.safetensors is corrupted"):
        convert_hf_to_mcore(out, tmp_path / "again", 1, 1, progress=False)
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("target", ["mp_rank_00_000/model.safetensors", "mcore_checkpoint.json"])
def test_export_refuses_a_checkpoint_that_differs_from_its_manifest(training_ckpt, tmp_path, target):
    path = training_ckpt / target
    if target.endswith(".json"):  # same-size edit of a value no shape check can see
        text = path.read_text()
        assert '"rms_norm_eps": 1e-06' in text
        path.write_text(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 9e-06'))
    else:
        _flip_byte(path)
    with pytest.raises(CheckpointCorruptError, match=rf"{target} is corrupted"):
        export_hf(training_ckpt, tmp_path / "hf_out")
    with pytest.raises(CheckpointCorruptError, match=rf"{target} is corrupted"):
        convert_mcore_to_hf(training_ckpt, tmp_path / "hf_tool", progress=False)
    assert not (tmp_path / "hf_out").exists() and not (tmp_path / "hf_tool").exists()


def test_conversion_outputs_carry_checksums_and_unlisted_shards_are_refused(hf_dir, tmp_path):
    mc = convert_hf_to_mcore(hf_dir, tmp_path / "mc", 2, 1, progress=False)
    listed = json.loads((mc / CHECKSUMS).read_text())["files"]
    assert {"mcore_checkpoint.json", "config.json", "mp_rank_00_000/model.safetensors",
            "mp_rank_01_000/model.safetensors"} == set(listed)
    manifest = json.loads((mc / CHECKSUMS).read_text())
    del manifest["files"]["mp_rank_01_000/model.safetensors"]
    (mc / CHECKSUMS).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointCorruptError, match=r"mp_rank_01_000/model\.safetensors is not listed"):
        convert_mcore_to_hf(mc, tmp_path / "out", progress=False)


def test_truncated_safetensors_errors_name_the_file(hf_dir, tmp_path):
    import shutil

    hf = tmp_path / "hf_trunc"
    shutil.copytree(hf_dir, hf)
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=rf"{weights} \(\d+ bytes\) is not a complete safetensors"):
        convert_hf_to_mcore(hf, tmp_path / "mc_bad", 1, 1, progress=False)
    mc = convert_hf_to_mcore(hf_dir, tmp_path / "mc", 1, 1, progress=False)
    shard = rank_file(mc, 0, 0)
    own = {k: v.clone() for k, v in load_file(shard).items()}
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=rf"{shard} \(\d+ bytes\) is not a complete"):
        convert_mcore_to_hf(mc, tmp_path / "hf_bad", progress=False, verify=False)
    with pytest.raises(CheckpointError, match=rf"{shard} \(\d+ bytes\) is not a complete"):
        copy_shard_into(own, shard)


def test_vocab_padding_mismatch_names_tensor_and_both_shapes(hf_dir, tmp_path):
    tiny = _tiny_module()
    mc = convert_hf_to_mcore(hf_dir, tmp_path / "mc", 1, 1, vocab_divisible_by=tiny.PAD_DIVISOR,
                             progress=False)
    padded = NamedTensors(load_file(rank_file(mc, 0, 0)))  # vocab padded to 512
    with pytest.raises(CheckpointError) as err:
        load_hf_into_model(padded, hf_dir, 1, 1, 0, 0, vocab_divisible_by=1)
    msg = str(err.value)
    assert "embedding.word_embeddings.weight: model [512, 128] vs checkpoint [500, 128]" in msg, msg
    assert "output_layer.weight" in msg and "\n" not in msg, msg
    load_hf_into_model(padded, hf_dir, 1, 1, 0, 0, vocab_divisible_by=tiny.PAD_DIVISOR)  # fits


def test_hf_checksums_size_check_at_load(hf_dir, training_ckpt, tmp_path):
    out = export_hf(training_ckpt, tmp_path / "hf_out", source_hf_dir=hf_dir)
    model = NamedTensors(load_file(rank_file(training_ckpt, 0, 0)))
    load_hf_into_model(model, out, 1, 1, 0, 0)
    (out / "config.json").write_text((out / "config.json").read_text() + " ")
    with pytest.raises(CheckpointCorruptError, match=r"config\.json has \d+ bytes, checksums\.json records"):
        load_hf_into_model(model, out, 1, 1, 0, 0)


def test_restricted_decoder_accepts_plain_state_only():
    from sophiavl_mcore.checkpoint.extra_state import decode_extra_state, sanitize_extra_states

    value = {"t": torch.arange(6.0).reshape(2, 3), "d": torch.float16, "s": torch.Size([2]),
             "n": [1, 2.5, "x", None, (True,)]}
    raw = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
    got = decode_extra_state("k", raw)
    assert torch.equal(got["t"], value["t"]) and got["d"] is torch.float16
    assert got["s"] == torch.Size([2]) and got["n"] == value["n"]
    empty = torch.empty(0, dtype=torch.uint8)
    assert sanitize_extra_states({"e": empty})["e"] is empty
    buf = io.BytesIO()
    torch.save({"x": 1}, buf)  # a torch.save zip is not a pickle stream: refused
    with pytest.raises(UnsafeExtraStateError, match="'z'"):
        decode_extra_state("z", torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8))
