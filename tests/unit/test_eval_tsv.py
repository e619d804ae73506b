"""eval/ readers: VLMEvalKit TSVs with real base64 PNG/JPEG images, index-referenced
images, missing optional columns and broken rows; the project's JSONL records."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from sophiavl_mcore.eval.aggregate import mme_report
from sophiavl_mcore.eval.registry import get_benchmark
from sophiavl_mcore.eval.samples import EvalDataError
from sophiavl_mcore.eval.tsv import read_benchmark, read_tsv


def _dots_png(n: int, color: tuple[int, int, int] = (255, 255, 255)) -> bytes:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for i in range(n):
        draw.ellipse([2 + 10 * i, 6, 8 + 10 * i, 12], fill=color)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _bar_jpeg() -> bytes:
    img = Image.new("RGB", (16, 16), (255, 255, 255))
    ImageDraw.Draw(img).rectangle([4, 2, 10, 15], fill=(0, 0, 255))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _write_tsv(path: Path, header: list[str], rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=header, delimiter="\t")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


HEADER = ["index", "image", "image_path", "question", "hint", "A", "B", "C", "answer", "category",
          "l2-category", "split", "question_type", "answer_type", "precision", "skills"]


def _bench_tsv(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    png, jpeg = _dots_png(3), _bar_jpeg()
    not_image = _b64(b"this is plain text, long enough to not be an index reference at all.")
    rows = [
        {"index": "1", "image": _b64(png), "question": "How many dots?", "hint": "count them",
         "A": "2", "B": "3", "C": "", "answer": "B", "category": "count", "l2-category": "perception",
         "split": "dev"},
        {"index": "2", "image": "1", "question": "Are there 3 dots?", "answer": "Yes",
         "category": "count"},
        {"index": "3", "image": "!!" + "not base64 " * 10, "question": "q3", "answer": "x"},
        {"index": "4", "image": _b64(png), "question": "", "answer": "x"},
        {"index": "5", "image": "99", "question": "q5", "answer": "x"},
        {"index": "6", "image": _b64(jpeg), "question": "Bar height?", "answer": "1.25",
         "question_type": "free_form", "answer_type": "float", "precision": "2.0",
         "skills": "['statistical reasoning']"},
        {"index": "7", "image": "", "question": "text only", "answer": "nan and more"},
        {"index": "8", "image": not_image, "question": "q8", "answer": "x"},
        {"index": "6", "image": "", "question": "again", "answer": "y"},
        {"index": "9", "image": "3", "question": "q9", "answer": "x"},
    ]
    return _write_tsv(tmp_path / "Toy_Bench.tsv", HEADER, rows), png, jpeg


def test_tsv_good_rows_and_fields(tmp_path: Path) -> None:
    path, png, jpeg = _bench_tsv(tmp_path)
    samples, _ = read_tsv(path)
    assert [s.index for s in samples] == ["1", "2", "6", "7"]
    first, second, bar, text = samples
    assert (first.question, first.hint, first.answer) == ("How many dots?", "count them", "B")
    assert dict(first.options) == {"A": "2", "B": "3"}  # the empty C is no option
    assert (first.category, first.l2_category, first.split) == ("count", "perception", "dev")
    assert first.problem_type == "multiple choice" and first.images == (png,)
    img = first.pil_image()
    assert img.size == (40, 20) and img.getpixel((5, 9)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (0, 0, 0)
    # row 2 reuses row 1's image by index
    assert second.images == (png,) and second.image_ref == "1" and second.image_key == "1"
    assert second.options == {} and second.problem_type == "free-form"
    assert bar.extras == {"question_type": "free_form", "answer_type": "float", "precision": "2.0",
                          "skills": "['statistical reasoning']"}
    assert bar.problem_type == "numerical" and bar.pil_image().getpixel((7, 8))[2] > 200
    assert bar.write_image(tmp_path / "img").endswith("6.jpg")
    assert Path(bar.write_image(tmp_path / "img")).read_bytes() == jpeg
    assert text.images == () and text.pil_image() is None and not text.has_image


def test_tsv_bad_rows_are_skipped_with_a_reason(tmp_path: Path) -> None:
    path, _, _ = _bench_tsv(tmp_path)
    _, skipped = read_tsv(path)
    by_row = {s.row: s for s in skipped}
    assert sorted(by_row) == ["2 (index='3')", "3 (index='4')", "4 (index='5')", "7 (index='8')",
                              "8 (index='6')", "9 (index='9')"]
    assert (by_row["2 (index='3')"].field, "base64" in by_row["2 (index='3')"].reason) == ("image", True)
    assert by_row["3 (index='4')"].field == "question"
    assert by_row["4 (index='5')"].field == "image" and "'99'" in by_row["4 (index='5')"].reason
    assert by_row["7 (index='8')"].field == "image" and "not a PNG" in by_row["7 (index='8')"].reason
    assert by_row["8 (index='6')"].field == "index"
    assert by_row["9 (index='9')"].field == "image" and "whose image is bad" in by_row["9 (index='9')"].reason
    line = str(by_row["3 (index='4')"])
    assert str(path) in line and "row 3" in line and "'question'" in line and "\n" not in line


def test_tsv_with_only_the_required_columns(tmp_path: Path) -> None:
    path = _write_tsv(tmp_path / "ChartQA_TEST.tsv", ["index", "question", "answer"],
                      [{"index": "10", "question": "What is the max?", "answer": "42"}])
    samples, skipped = read_benchmark(path)
    assert skipped == [] and len(samples) == 1
    s = samples[0]
    assert (s.hint, s.category, s.l2_category, s.split, s.options, s.images, s.extras) == (
        "", "", "", "", {}, (), {})
    assert s.problem_type == "numerical"
    assert get_benchmark("chartqa").score_reply("<think>t</think><answer>41</answer>", s).score == 1.0


def test_tsv_without_a_required_column_is_an_error(tmp_path: Path) -> None:
    path = _write_tsv(tmp_path / "x.tsv", ["index", "question"], [{"index": "1", "question": "q"}])
    with pytest.raises(EvalDataError, match="'answer'"):
        read_tsv(path)
    with pytest.raises(EvalDataError, match="unknown benchmark file type"):
        read_benchmark(tmp_path / "x.csv")


def test_xlsx_needs_openpyxl(tmp_path: Path) -> None:
    try:
        import openpyxl  # noqa: F401
    except ImportError:
        path = tmp_path / "MMBench.xlsx"
        path.write_bytes(b"PK")
        with pytest.raises(EvalDataError, match="openpyxl"):
            read_benchmark(path)
    else:
        pytest.skip("openpyxl is installed")


def test_mme_tsv_pairs_questions_by_image_reference(tmp_path: Path) -> None:
    png1, png2 = _dots_png(1), _dots_png(2, (255, 0, 0))
    rows = [
        {"index": "0", "image": _b64(png1), "question": "One dot?", "answer": "Yes", "category": "count"},
        {"index": "1", "image": "0", "question": "Two dots?", "answer": "No", "category": "count"},
        {"index": "2", "image": _b64(png2), "question": "Red?", "answer": "Yes", "category": "color"},
        {"index": "3", "image": "2", "question": "Blue?", "answer": "No", "category": "color"},
    ]
    samples, skipped = read_tsv(_write_tsv(tmp_path / "MME.tsv", ["index", "image", "question",
                                                                  "answer", "category"], rows))
    assert skipped == []
    mme = get_benchmark("mme")
    replies = ["<think>a</think><answer>yes</answer>", "<think>a</think><answer>no</answer>",
               "<think>a</think><answer>yes</answer>", "<think>a</think><answer>yes</answer>"]
    report = mme.aggregate([mme.score_reply(r, s) for r, s in zip(replies, samples, strict=True)],
                           samples)
    # count: both right → acc 100, acc+ 100; color: one of two → acc 50, acc+ 0
    assert report["mme_category"]["count"]["score"] == 200.0
    assert report["mme_category"]["color"]["score"] == 50.0
    assert report["perception"] == 250.0 and report["cognition"] == 0.0
    assert mme_report([1, 1, 1, 0], samples)["perception"] == 250.0


def test_project_jsonl_records(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_dots_png(2))
    records = [
        {"problem_id": 1, "problem": "How many dots are in the image?", "data_type": "image",
         "problem_type": "numerical", "options": [], "solution": "<answer>2</answer>",
         "path": "img/a.png", "data_source": "dots_clean"},
        {"problem_id": 2, "data_type": "text", "problem_type": "numerical",
         "solution": "<answer>1</answer>"},
        {"problem_id": 3, "problem": "Pick", "data_type": "text", "problem_type": "multiple choice",
         "options": ["cat", "dog"], "solution": "<answer>B</answer>"},
        {"problem_id": 4, "problem": "Say", "data_type": "text", "problem_type": "text",
         "solution": "<answer>hello there</answer>"},
        {"problem_id": 1, "problem": "dup", "data_type": "text", "problem_type": "OCR",
         "solution": "<answer>x</answer>"},
    ]
    path = tmp_path / "dots_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    samples, skipped = read_benchmark(path)
    assert [s.index for s in samples] == ["1", "3", "4"]
    dots, pick, say = samples
    assert (dots.answer, dots.problem_type, dots.category) == ("2", "numerical", "dots_clean")
    assert dots.has_image and dots.pil_image().size == (40, 20)
    assert dots.write_image(tmp_path / "out") == str(tmp_path / "img" / "a.png")
    assert dict(pick.options) == {"A": "cat", "B": "dog"} and pick.problem_type == "multiple choice"
    assert say.problem_type == "free-form"
    assert [(s.row, s.field) for s in skipped] == [("2", "problem"), ("5", "problem_id")]
    dots_bench = get_benchmark("dots")
    record = dots_bench.record(dots)
    assert (record.problem_type, record.image_path, record.answer) == ("numerical", dots.image_path, "2")
    assert dots_bench.score_reply("<think>2 dots</think><answer>2</answer>", dots).score == 1.0
    assert dots_bench.score_reply("I count 3", dots).score == 0.0
