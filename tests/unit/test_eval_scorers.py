"""eval/: extraction, scorers and aggregates against hand-written tables (every expected
value is worked out by hand here, none comes from the code under test)."""

from __future__ import annotations

import math

import pytest

from sophiavl_mcore.data.config import PromptConfig
from sophiavl_mcore.eval.aggregate import (
    accuracy_report,
    circular_report,
    majority_vote,
    majority_vote_accuracy,
    mean_pass_at_k,
    mme_report,
    pass_at_k,
)
from sophiavl_mcore.eval.extract import extract_answer
from sophiavl_mcore.eval.registry import (
    Benchmark,
    benchmark_for_file,
    get_benchmark,
    register_benchmark,
)
from sophiavl_mcore.eval.samples import EvalSample
from sophiavl_mcore.eval.scorers import (
    score_exact,
    score_free_form,
    score_multiple_choice,
    score_numeric,
    score_ocr,
    score_relaxed,
    score_yes_no,
)


def _s(answer: str, **kw: object) -> EvalSample:
    return EvalSample(index=str(kw.pop("index", "0")), question=str(kw.pop("question", "q")),
                      answer=answer, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ extraction

EXTRACTION_TABLE = [
    # reply, expected text, method, well_formed
    ("<think>2+2</think><answer>4</answer>", "4", "answer_tag", True),
    ("<think>x</think>\n<answer> \\boxed{3} </answer>", "3", "answer_tag", True),
    ("<answer>B</answer>", "B", "answer_tag", False),  # no <think>: broken format, tag still read
    ("<think>a</think> so \\boxed{\\frac{\\sqrt{2}}{2}} and", "\\frac{\\sqrt{2}}{2}", "boxed", False),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed", False),
    ("The answer is B.", "B", "option", False),
    ("Looking at the chart, the answer is (C) since it is tallest", "C", "option", False),
    ("so it must be D", "D", "option", False),
    ("I think (A)", "A", "option", False),
    ("there are 12 apples and 7 pears", "7", "number", False),
    ("total: 1,234.5 dollars", "1,234.5", "number", False),
    ("I do not know", "I do not know", "raw", False),
    ("   ", "", "none", False),
]


@pytest.mark.parametrize(("reply", "text", "method", "well_formed"), EXTRACTION_TABLE)
def test_extraction_table(reply: str, text: str, method: str, well_formed: bool) -> None:
    got = extract_answer(reply)
    assert (got.text, got.method, got.well_formed) == (text, method, well_formed)


def test_extraction_fallbacks_can_be_narrowed() -> None:
    got = extract_answer("there are 2 dogs, so yes", fallbacks=("boxed",))
    assert (got.text, got.method) == ("there are 2 dogs, so yes", "raw")
    assert extract_answer("pick E", letters="ABCD").method == "raw"
    with pytest.raises(ValueError, match="unknown fallbacks"):
        extract_answer("x", fallbacks=("judge",))


# ------------------------------------------------------------------ scorers

FLOAT2 = {"answer_type": "float", "precision": "2"}
FLOAT1 = {"answer_type": "float", "precision": "1.0"}
INTEGER = {"answer_type": "integer", "precision": ""}
TEXT = {"answer_type": "text"}

NUMERIC_TABLE = [
    ("1.250", "1.25", FLOAT2, 1.0),
    ("1.25", "1.25", FLOAT2, 1.0),
    ("1.26", "1.25", FLOAT2, 0.0),
    ("1.249", "1.25", FLOAT2, 1.0),  # rounds half-up to 1.25
    ("1.46", "1.5", FLOAT1, 1.0),  # 1.5 at one decimal
    ("1.44", "1.5", FLOAT1, 0.0),  # 1.4
    ("3", "3", INTEGER, 1.0),
    ("3.0", "3", INTEGER, 1.0),
    ("3.7", "3", INTEGER, 0.0),
    ("4", "3", INTEGER, 0.0),
    ("three", "3", INTEGER, 0.0),
    ("yes.", "Yes", TEXT, 1.0),
    ("no", "Yes", TEXT, 0.0),
    ("1/2", "0.5", {}, 1.0),  # no answer_type: the project's exact numeric grader
    ("0.6", "0.5", {}, 0.0),
    ("5 cm", "5", {}, 1.0),
]


@pytest.mark.parametrize(("pred", "gold", "extras", "expected"), NUMERIC_TABLE)
def test_numeric_mathvista_rules(pred: str, gold: str, extras: dict, expected: float) -> None:
    assert score_numeric(pred, _s(gold, extras=extras)) == expected


RELAXED_TABLE = [
    ("104.9", "100", 1.0), ("105.1", "100", 0.0), ("105", "100", 1.0), ("95", "100", 1.0),
    ("94.9", "100", 0.0), ("100%", "100", 1.0), ("12", "12%", 1.0), ("1020", "1,000", 1.0),
    ("0", "0", 1.0), ("0.01", "0", 0.0), ("canada", "Canada", 1.0), ("Canadas", "Canada", 0.0),
    ("YES", "Yes", 1.0),
]


@pytest.mark.parametrize(("pred", "gold", "expected"), RELAXED_TABLE)
def test_chartqa_relaxed_accuracy(pred: str, gold: str, expected: float) -> None:
    assert score_relaxed(pred, _s(gold)) == expected


OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
MC_TABLE = [
    ("B", 1.0), ("(B)", 1.0), ("b", 1.0), ("The answer is B.", 1.0), ("**B**", 1.0),
    ("blue", 1.0), ("B. blue", 1.0), ("B, C", 0.0), ("B and D", 0.0), ("A", 0.0),
    ("blue or red", 0.0), ("", 0.0),
]


@pytest.mark.parametrize(("pred", "expected"), MC_TABLE)
def test_multiple_choice_phrasings(pred: str, expected: float) -> None:
    assert score_multiple_choice(pred, _s("B", options=OPTIONS)) == expected


def test_multiple_choice_gold_given_as_option_text() -> None:
    sample = _s("4", options={"A": "2", "B": "4", "C": "8"},
                extras={"question_type": "multi_choice", "answer_type": "text"})
    mathvista = get_benchmark("mathvista").scorer
    assert [mathvista(p, sample) for p in ("B", "4", "(B) 4", "A", "2")] == [1.0, 1.0, 1.0, 0.0, 0.0]


YES_NO_TABLE = [
    ("yes", "Yes", 1.0), ("Yes, there is a dog.", "Yes", 1.0), ("No", "Yes", 0.0),
    ("yes and no", "Yes", 0.0), ("maybe", "Yes", 0.0), ("no.", "No", 1.0), ("Yes", "No", 0.0),
]


@pytest.mark.parametrize(("pred", "gold", "expected"), YES_NO_TABLE)
def test_yes_no(pred: str, gold: str, expected: float) -> None:
    assert score_yes_no(pred, _s(gold)) == expected


def test_free_form_rouge_and_ocr_by_hand() -> None:
    assert score_free_form("the cat sat", _s("the cat sat")) == pytest.approx(1.0)
    assert score_free_form("dog", _s("the cat sat")) == pytest.approx(0.0)
    # ref 6 words, hyp "the cat": R1 F = 2·1·(1/3)/(4/3) = 1/2; R2 F = 2·1·(1/5)/(6/5) = 1/3;
    # RL (LCS 2) = 1/2; mean 4/9.
    assert score_free_form("the cat", _s("the cat sat on the mat")) == pytest.approx(4 / 9)
    assert score_ocr("a b c x", _s("a b c d")) == pytest.approx(math.exp(-0.25))
    assert score_exact(" Paris. ", _s("paris")) == 1.0


# ------------------------------------------------------------------ aggregates


def test_mme_acc_plus_and_sums_by_hand() -> None:
    # existence (perception): image p1 right/right, image p2 right/wrong;
    # code_reasoning (cognition): image r1 wrong/right, its second question pointing at the
    # first by image reference (no image_path column).
    samples = [
        _s("Yes", index="1", category="existence", image_path="p1.png"),
        _s("No", index="2", category="existence", image_path="p1.png"),
        _s("Yes", index="3", category="existence", image_path="p2.png"),
        _s("No", index="4", category="existence", image_path="p2.png"),
        _s("Yes", index="5", category="code_reasoning"),
        _s("No", index="6", category="code_reasoning", image_ref="5"),
    ]
    scores = [1, 1, 1, 0, 0, 1]
    report = mme_report(scores, samples)
    existence = report["mme_category"]["existence"]
    # acc = 3/4 · 100 = 75, acc+ = 1/2 images · 100 = 50, score 125
    assert (existence["acc"], existence["acc_plus"], existence["score"]) == (75.0, 50.0, 125.0)
    code = report["mme_category"]["code_reasoning"]
    assert (code["acc"], code["acc_plus"], code["score"], code["images"]) == (50.0, 0.0, 50.0, 1)
    assert (report["perception"], report["cognition"], report["total"]) == (125.0, 50.0, 175.0)
    assert report["overall"] == {"acc": 4 / 6, "n": 6}


def test_accuracy_report_per_category_and_skill() -> None:
    samples = [
        _s("1", category="geo", l2_category="math", extras={"skills": "['algebra', 'geometry']"}),
        _s("1", category="geo", l2_category="math", extras={"skills": "['geometry']"}),
        _s("1", category="chart", extras={"skills": "algebra, statistics"}),
    ]
    report = accuracy_report([1.0, 0.0, 1.0], samples)
    assert report["overall"] == {"acc": 2 / 3, "n": 3}
    assert report["category"] == {"chart": {"acc": 1.0, "n": 1}, "geo": {"acc": 0.5, "n": 2}}
    assert report["l2_category"] == {"math": {"acc": 0.5, "n": 2}}
    assert report["skill"] == {"algebra": {"acc": 1.0, "n": 2}, "geometry": {"acc": 0.5, "n": 2},
                               "statistics": {"acc": 1.0, "n": 1}}


def test_mmbench_circular_accuracy() -> None:
    samples = [_s("A", index=i) for i in ("5", "1000005", "2000005", "6", "1000006")]
    report = circular_report([1, 1, 0, 1, 1], samples)
    assert report["circular"] == {"acc": 0.5, "n": 2}
    assert report["overall"]["acc"] == pytest.approx(4 / 5)


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (5, 2, 2, 1 - 3 / 10),  # 1 − C(3,2)/C(5,2)
    (4, 1, 1, 1 - 3 / 4),  # 1 − C(3,1)/C(4,1)
    (5, 2, 1, 1 - 3 / 5),
    (3, 2, 2, 1.0),  # n − c < k
    (10, 0, 3, 0.0),
    (6, 3, 3, 1 - 1 / 20),  # 1 − C(3,3)/C(6,3)
])
def test_pass_at_k_formula(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_mean_pass_at_k_and_bad_arguments() -> None:
    assert mean_pass_at_k([(5, 2), (4, 1)], 1) == pytest.approx((0.4 + 0.25) / 2)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_majority_vote() -> None:
    assert majority_vote(["3", "3.0", "4"]) == "3"  # 3 and 3.0 agree
    assert majority_vote(["x", "y"]) == "x"  # tie: the first
    assert majority_vote(["A", "B", "b"]) == "B"
    questions = [_s("3"), _s("A", options={"A": "cat", "B": "dog"})]
    answers = [["3.0", "4", "3"], ["A", "B", "B"]]
    # question 1: "3.0" and "3" agree (2 of 3) → right; question 2: "B" (2 of 3) ≠ gold A
    assert majority_vote_accuracy(answers, questions, score_numeric) == 0.5
    mc = [questions[1]]
    assert majority_vote_accuracy([["B", "A", "A"]], mc, score_multiple_choice) == 1.0


# ------------------------------------------------------------------ registry


def test_benchmark_reply_scoring_and_format_failure_rate() -> None:
    mme = get_benchmark("mme")
    sample = _s("Yes", category="existence", image_path="a.png")
    good = mme.score_reply("<think>I see it</think><answer>Yes</answer>", sample)
    broken = mme.score_reply("There are 2 dogs, so yes.", sample)
    assert (good.score, good.extraction.well_formed) == (1.0, True)
    assert (broken.score, broken.extraction.method) == (1.0, "raw")
    report = mme.aggregate([good, broken], [sample, sample])
    assert report["format_failure_rate"] == 0.5
    assert report["extraction"] == {"answer_tag": 1, "raw": 1}


def test_prompt_reuses_the_training_prompt_config() -> None:
    cfg = PromptConfig()
    sample = _s("B", question="Which is blue?", hint="Look closely", options=OPTIONS)
    text = get_benchmark("mmbench").prompt_text(sample, cfg)
    assert "Hint: Look closely\nQuestion: Which is blue?" in text
    assert "A. red\nB. blue\nC. green\nD. yellow" in text
    assert text.endswith(cfg.type_instructions["multiple choice"])
    # the numeric instruction comes from metadata the question states, never from the gold
    numeric = _s("7", extras={"answer_type": "integer"})
    assert get_benchmark("mathvista").prompt_text(numeric, cfg).endswith(cfg.type_instructions["numerical"])
    assert get_benchmark("chartqa").prompt_text(_s("7"), cfg).endswith(cfg.type_instructions["free-form"])


def test_benchmark_for_file_and_extension() -> None:
    names = {f: benchmark_for_file(f).name for f in (
        "MathVista_MINI.tsv", "MathVerse_MINI_Vision_Only.tsv", "MMMU_DEV_VAL.tsv", "MME.tsv",
        "ChartQA_TEST.tsv", "MMBench_DEV_EN.tsv", "MMStar.tsv", "dots_val.jsonl", "MMERealWorld.tsv",
        "other.tsv")}
    assert names == {
        "MathVista_MINI.tsv": "mathvista", "MathVerse_MINI_Vision_Only.tsv": "mathverse",
        "MMMU_DEV_VAL.tsv": "mmmu", "MME.tsv": "mme", "ChartQA_TEST.tsv": "chartqa",
        "MMBench_DEV_EN.tsv": "mmbench", "MMStar.tsv": "mmstar", "dots_val.jsonl": "dots",
        "MMERealWorld.tsv": "generic", "other.tsv": "generic"}
    assert get_benchmark("mathverse").needs_judge and not get_benchmark("mme").needs_judge
    generic = get_benchmark("generic").scorer
    assert generic("B", _s("B", options=OPTIONS)) == 1.0
    assert generic("2.0", _s("2", problem_type="numerical")) == 1.0
    mine = register_benchmark(Benchmark("unit-test-bench", "exact", score_exact,
                                        file_prefixes=("unittestbench",)), replace=True)
    assert benchmark_for_file("UnitTestBench_v2.tsv") is mine
    with pytest.raises(ValueError, match="already registered"):
        register_benchmark(Benchmark("unit-test-bench", "exact", score_exact))
    with pytest.raises(KeyError, match="unknown benchmark"):
        get_benchmark("nope")
