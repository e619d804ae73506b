"""Bad inputs fail early with clear messages: missing shard, config/checkpoint mismatch,
impossible layouts (before any tensor is read or written)."""

from __future__ import annotations

import json

import pytest
from _tiny import write_tiny_qwen2

from sophiavl_mcore.checkpoint import CheckpointError, convert_hf_to_mcore, convert_mcore_to_hf
from sophiavl_mcore.checkpoint.convert import rank_file
from sophiavl_mcore.parallel import LayoutError, ParallelConfig, validate_layout


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_qwen2(tmp_path_factory.mktemp("hf"), shard=True)


def test_missing_hf_shard_named(hf_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        convert_hf_to_mcore(broken, tmp_path / "out", 1, 1, progress=False)
    assert not (tmp_path / "out").exists()  # nothing written


def test_config_shape_mismatch_named(hf_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight has shape \[256, 128\].*\[512, 128\]"):
        convert_hf_to_mcore(bad, tmp_path / "out", 1, 1, progress=False)
    assert not (tmp_path / "out").exists()


def test_impossible_layout_every_number(hf_dir, tmp_path):
    # 4 heads / 2 kv groups / 4 layers: tp=4 breaks the groups, pp=3 the layers.
    with pytest.raises(LayoutError) as err:
        convert_hf_to_mcore(hf_dir, tmp_path / "out", 4, 3, progress=False)
    msg = str(err.value)
    for text in ("world_size=12", "tp=4", "pp=3", "num_query_groups (num_key_value_heads)=2",
                 "num_layers=4 is not divisible by pp=3"):
        assert text in msg, msg
    assert not (tmp_path / "out").exists()
    with pytest.raises(LayoutError, match=r"world_size=6 is not divisible by tp\*pp=2\*2=4"):
        validate_layout(ParallelConfig(tp=2, pp=2), 6, 4, 4, 2)
    with pytest.raises(LayoutError, match=r"dp=3 but world_size=8"):
        validate_layout(ParallelConfig(tp=2, pp=2, dp=3), 8, 4, 4, 2)
    with pytest.raises(LayoutError, match=r"sums to 5, the model has num_layers=4"):
        validate_layout(ParallelConfig(pp=2, layers_per_stage=[3, 2]), 2, 4, 4, 2)
    validate_layout(ParallelConfig(pp=2, layers_per_stage=[3, 1]), 2, 4, 4, 2)  # uneven is fine


def test_mcore_missing_rank_and_wrong_shape(hf_dir, tmp_path):
    mc = convert_hf_to_mcore(hf_dir, tmp_path / "mc", 2, 2, progress=False)
    meta_path = mc / "mcore_checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta["hf_config"]["hidden_size"] = 64  # checkpoint no longer matches its config
    meta_path.write_text(json.dumps(meta))
    # The edit is caught by checksums.json first; unverified, the shape check names it.
    with pytest.raises(CheckpointError, match=r"mcore_checkpoint\.json (has \d+ bytes|is corrupted)"):
        convert_mcore_to_hf(mc, tmp_path / "hf_out", progress=False)
    with pytest.raises(CheckpointError, match="shape"):
        convert_mcore_to_hf(mc, tmp_path / "hf_out", progress=False, verify=False)
    meta["hf_config"]["hidden_size"] = 128
    meta_path.write_text(json.dumps(meta))
    rank_file(mc, 1, 1).unlink()
    with pytest.raises(CheckpointError, match=r"mp_rank_01_001/model.safetensors is missing"):
        convert_mcore_to_hf(mc, tmp_path / "hf_out2", progress=False)
    assert not (tmp_path / "hf_out2").exists()
