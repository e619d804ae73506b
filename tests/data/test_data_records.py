"""Records: loaders, schema errors, weighted mixing, deterministic resumable order."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from sophiavl_mcore.data.config import DataConfig, DataSourceConfig
from sophiavl_mcore.data.records import MixedSampler, RecordError, build_sampler, load_records
from sophiavl_mcore.data.synthetic import write_records
from sophiavl_mcore.rewards.outcome import ProblemTypeError


def raw(i: int, **over) -> dict:
    rec = {
        "problem_id": i,
        "problem": f"What is shown in picture {i}?",
        "data_type": "image",
        "problem_type": "multiple choice",
        "options": ["A. cat", "B. dog"],
        "solution": "<answer>B</answer>",
        "path": f"img/{i}.jpg",
        "data_source": "unit",
    }
    rec.update(over)
    return rec


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_loaders_agree(tmp_path, suffix):
    records = [raw(0), raw(1, data_type="text", path=None, problem_type="numerical", options=[],
                        solution="<answer> 3.5 </answer>")]
    path = write_records(tmp_path / f"d{suffix}", records)
    got = load_records(path, image_root="/root/images")
    assert [r.problem_id for r in got] == ["0", "1"]
    assert got[0].image_path == "/root/images/img/0.jpg" and got[0].options == ("A. cat", "B. dog")
    assert got[0].answer == "B" and got[1].answer == "3.5"
    assert got[1].image_path is None and not got[1].has_image
    assert got[0].data_source == "unit"


def test_default_image_root_and_source(tmp_path):
    rec = raw(5)
    del rec["data_source"]
    path = write_records(tmp_path / "mine.jsonl", [rec])
    (got,) = load_records(path)
    assert got.image_path == str(tmp_path / "img/5.jpg") and got.data_source == "mine"


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ({"problem_type": "essay"}, "problem_type", "numerical"),
        ({"options": "A. cat"}, "options", "list of strings"),
        ({"options": [1, 2]}, "options", "list of strings"),
        ({"problem": 17}, "problem", "string"),
        ({"problem_id": 1.5}, "problem_id", "int or a string"),
        ({"data_type": "video"}, "data_type", "image"),
        ({"solution": "B"}, "solution", "<answer>"),
        ({"path": ""}, "path", "empty"),
        ({"path": None}, "path", "string"),
    ],
)
def test_schema_errors_name_file_record_field(tmp_path, override, field, expected):
    path = write_records(tmp_path / "bad.jsonl", [raw(0), raw(1), raw(2, **override)])
    with pytest.raises(RecordError) as err:  # ProblemTypeError is a RecordError
        load_records(path)
    msg = str(err.value)
    assert str(path) in msg and ":3" in msg, msg  # line 3 of the JSONL file
    # the record is named by its id, unless the id itself is the bad field
    assert field == "problem_id" or "problem_id=2" in msg, msg
    assert repr(field) in msg and expected in msg, msg


def test_unknown_problem_type_in_parquet_and_json(tmp_path):
    for suffix, where in ((".parquet", "row #1"), (".json", "record #1")):
        path = write_records(tmp_path / f"p{suffix}", [raw(0), raw(7, problem_type="counting")])
        with pytest.raises(ProblemTypeError, match=rf"{where} \(problem_id=7\): field 'problem_type' is 'counting'"):
            load_records(path)


def test_missing_field_and_bad_files(tmp_path):
    rec = raw(3)
    del rec["solution"]
    with pytest.raises(RecordError, match=r"problem_id=3.*missing field 'solution'"):
        load_records(write_records(tmp_path / "m.json", [rec]))
    bad = tmp_path / "broken.jsonl"
    bad.write_text(json.dumps(raw(0)) + "\n{not json\n")
    with pytest.raises(RecordError, match=r"broken.jsonl:2: not valid JSON"):
        load_records(bad)
    with pytest.raises(RecordError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(RecordError, match="unknown data file type"):
        (tmp_path / "x.csv").write_text("a")
        load_records(tmp_path / "x.csv")
    with pytest.raises(RecordError, match="appears twice"):
        load_records(write_records(tmp_path / "dup.jsonl", [raw(1), raw(1)]))


# ------------------------------------------------------------------ issue 17: encodings, ids
# Before the fix (records.py at c4a9202): bad UTF-8 raised a bare UnicodeDecodeError, a
# byte-order mark failed as "not valid JSON", duplicate ids were named by record index
# without saying that 7 and "7" collide, and ProblemTypeError was no RecordError.


def _jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def test_invalid_utf8_names_file_and_line(tmp_path):
    lines = _jsonl_bytes([raw(0), raw(1)]).splitlines(keepends=True)
    bad = lines[1].replace(b"picture", b"pict\xffure")
    path = tmp_path / "latin.jsonl"
    path.write_bytes(lines[0] + bad)
    with pytest.raises(RecordError, match=rf"{path}:2: not valid UTF-8 \(byte 0xff at column \d+\)"):
        load_records(path)
    whole = tmp_path / "latin.json"
    whole.write_bytes(b"[\n" + json.dumps(raw(0)).encode() + b",\n" + json.dumps(raw(1)).encode()
                      .replace(b"picture", b"pict\xe9ure") + b"\n]")
    with pytest.raises(RecordError, match=rf"{whole}:3: not valid UTF-8 \(byte 0xe9"):
        load_records(whole)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_byte_order_mark_is_read(tmp_path, suffix):
    plain = write_records(tmp_path / f"plain{suffix}", [raw(0), raw(1, problem="Größe?")])
    bom = tmp_path / f"bom{suffix}"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    got = load_records(bom, name="x")
    assert got == load_records(plain, name="x")
    assert got[1].problem == "Größe?"


def test_duplicate_ids_name_both_lines_and_the_int_str_collision(tmp_path):
    path = write_records(tmp_path / "dup.jsonl", [raw(4), raw(5), raw(4)])
    with pytest.raises(RecordError, match=rf"problem_id 4 appears twice, at {path}:1 and at {path}:3"):
        load_records(path)
    path = write_records(tmp_path / "mixed.jsonl", [raw(7), raw(8), raw("7")])
    with pytest.raises(RecordError) as err:
        load_records(path)
    msg = str(err.value)
    assert f"{path}:1" in msg and f"{path}:3" in msg, msg
    assert "7 and '7' count as the same id" in msg, msg
    listed = tmp_path / "dup.json"  # a JSON list: the line where each record starts
    listed.write_text("[\n" + ",\n".join(json.dumps(raw(i)) for i in (4, 5, 4)) + "\n]\n")
    with pytest.raises(RecordError, match=rf"at {listed}:2 record #0 and at {listed}:4 record #2"):
        load_records(listed)


def test_problem_type_errors_are_record_errors(tmp_path):
    assert issubclass(ProblemTypeError, RecordError)
    path = write_records(tmp_path / "t.jsonl", [raw(0, problem_type="essay")])
    with pytest.raises(RecordError, match=rf"{path}:1 \(problem_id=0\): field 'problem_type' is 'essay'"):
        load_records(path)


def test_released_text_type_is_free_form(tmp_path):
    path = write_records(tmp_path / "t.jsonl", [
        raw(0, problem_type="text", options=[], solution="<answer>a red bus</answer>")])
    (rec,) = load_records(path)
    assert rec.problem_type == "free-form" and rec.answer == "a red bus"


def fake_sources(sizes):
    return [[f"s{s}-{i}" for i in range(n)] for s, n in enumerate(sizes)]


def test_mixing_counts_follow_weights():
    srcs = fake_sources([10, 5])
    sampler = MixedSampler(srcs, weights=[3.0, 1.0], seed=1, epoch_size=20)
    epoch = sampler.next_batch(20)
    counts = Counter(x.split("-")[0] for x in epoch)
    assert counts == {"s0": 15, "s1": 5}  # 20·3/4 and 20·1/4
    s0 = Counter(x for x in epoch if x.startswith("s0"))
    # upsampled source: a full pass (every record once) before any record repeats
    assert set(s0) == set(srcs[0]) and sorted(s0.values()) == [1] * 5 + [2] * 5
    assert sorted(x for x in epoch if x.startswith("s1")) == sorted(srcs[1])


def test_largest_remainder_shares():
    sampler = MixedSampler(fake_sources([4, 4, 4]), weights=[1, 1, 1], seed=0, epoch_size=10)
    counts = Counter(x.split("-")[0] for x in sampler.next_batch(10))
    assert sorted(counts.values()) == [3, 3, 4]


def test_order_is_deterministic_and_changes_per_epoch():
    a = MixedSampler(fake_sources([7, 6]), seed=3)
    b = MixedSampler(fake_sources([7, 6]), seed=3)
    c = MixedSampler(fake_sources([7, 6]), seed=4)
    ea, eb, ec = a.next_batch(13), b.next_batch(13), c.next_batch(13)
    assert ea == eb and ea != ec
    assert sorted(ea) == sorted(sum(fake_sources([7, 6]), []))  # default weights: each once
    assert a.next_batch(13) != ea  # epoch 1 is reshuffled
    plain = MixedSampler(fake_sources([3]), shuffle=False)
    assert plain.next_batch(7) == ["s0-0", "s0-1", "s0-2"] * 2 + ["s0-0"]


@pytest.mark.parametrize("cut", [1, 5, 13, 17, 30])
def test_resume_sees_exactly_the_same_samples(cut):
    kwargs = dict(weights=[2.0, 1.0], seed=11, epoch_size=13)
    ref = MixedSampler(fake_sources([7, 6]), **kwargs)
    expected = ref.next_batch(60)
    first = MixedSampler(fake_sources([7, 6]), **kwargs)
    head = first.next_batch(cut)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint file
    resumed = MixedSampler(fake_sources([7, 6]), **kwargs)
    resumed.load_state_dict(state)
    assert head + resumed.next_batch(60 - cut) == expected


def test_resume_with_other_data_is_refused():
    s = MixedSampler(fake_sources([7, 6]), seed=1)
    s.next_batch(3)
    other = MixedSampler(fake_sources([7, 5]), seed=1)
    with pytest.raises(ValueError, match=r"sizes.*\[7, 6\].*\[7, 5\]"):
        other.load_state_dict(s.state_dict())


def test_build_sampler_and_config_checks(tmp_path):
    p1 = write_records(tmp_path / "a.jsonl", [raw(i) for i in range(4)])
    p2 = write_records(tmp_path / "b.parquet", [raw(i, data_type="text", path=None) for i in range(2)])
    cfg = DataConfig(sources=[DataSourceConfig(path=str(p1), weight=1.0),
                              DataSourceConfig(path=str(p2), weight=3.0, name="bee")], epoch_size=8)
    sampler = build_sampler(cfg)
    batch = sampler.next_batch(8)
    assert Counter(r.data_source for r in batch) == {"unit": 8}  # data_source from records
    assert sum(r.has_image for r in batch) == 2
    with pytest.raises(ValueError, match=r"sources\[0\].*weight must be > 0, got -1"):
        DataConfig(sources=[DataSourceConfig(path="x", weight=-1.0)])
    with pytest.raises(ValueError, match="epoch_size must be >= 0"):
        DataConfig(epoch_size=-2)
