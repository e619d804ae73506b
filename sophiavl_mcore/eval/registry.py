"""Benchmarks by name: how to prompt a sample, extract and score a reply, aggregate.

A :class:`Benchmark` turns an :class:`~sophiavl_mcore.eval.samples.EvalSample` into the
project's :class:`~sophiavl_mcore.data.records.Record`, so the training prompt config
(``data.prompts``: system prompt, ``<think>/<answer>`` format, per-type instructions)
is reused as is; the prompt type never looks at the gold answer (options → multiple
choice; a MathVista ``answer_type`` of integer/float, which its question states →
numerical; else the benchmark's default type, or the record's own type for project
records). A reply is scored by :meth:`Benchmark.score_reply`: extraction
(:mod:`.extract`, with the benchmark's fallbacks), then the scorer (:mod:`.scorers`).

Built-ins: ``mathvista``, ``mathverse``, ``mmmu``, ``mme``, ``chartqa``, ``mmbench``,
``mmstar``, ``dots`` (the project's synthetic dots task) and ``generic``.
:func:`benchmark_for_file` picks one from a file name (``MathVista_MINI.tsv`` →
mathvista: the lower-cased stem equals a benchmark's prefix or starts with it followed
by ``_``, ``-`` or ``.``), else ``generic``, which scores each row by its type (options →
multiple choice, numeric answer → numeric, OCR records → exp(−WER), else ROUGE).

Adding a benchmark, without touching the harness::

    from sophiavl_mcore.eval.registry import Benchmark, register_benchmark
    from sophiavl_mcore.eval.scorers import score_exact

    register_benchmark(Benchmark(name="mybench", family="exact", scorer=score_exact,
                                 file_prefixes=("mybench",)))

``scorer`` is any ``(extracted answer, sample) -> float in [0, 1]``; ``aggregator`` any
``(scores, samples) -> dict`` (default :func:`.aggregate.accuracy_report`); ``fallbacks``
narrows the extraction when the reply has no ``<answer>`` tag.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sophiavl_mcore.data.config import PromptConfig
from sophiavl_mcore.data.prompts import question_text
from sophiavl_mcore.data.records import Record
from sophiavl_mcore.data.schema import PROBLEM_TYPES
from sophiavl_mcore.eval.aggregate import accuracy_report, circular_report, mme_report
from sophiavl_mcore.eval.extract import ALL_FALLBACKS, Extraction, extract_answer
from sophiavl_mcore.eval.samples import EvalSample
from sophiavl_mcore.eval.scorers import (
    Scorer,
    score_exact,
    score_free_form,
    score_multiple_choice,
    score_numeric,
    score_ocr,
    score_relaxed,
    score_yes_no,
)

__all__ = ["Benchmark", "ScoredReply", "benchmark_for_file", "benchmark_names",
           "get_benchmark", "register_benchmark"]

Aggregator = Callable[[Sequence[float], Sequence[EvalSample]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class ScoredReply:
    """One reply: what was extracted from it and its score."""

    extraction: Extraction
    score: float


def _all_fallbacks(sample: EvalSample) -> Sequence[str]:
    return ALL_FALLBACKS


def _mc_fallbacks(sample: EvalSample) -> Sequence[str]:
    return ("boxed", "option")


def _number_fallbacks(sample: EvalSample) -> Sequence[str]:
    return ("boxed", "number")


def _text_fallbacks(sample: EvalSample) -> Sequence[str]:
    return ("boxed",)


def _is_mc(sample: EvalSample) -> bool:
    return bool(sample.options) or sample.problem_type == "multiple choice"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A benchmark's rules. ``prompt_type`` is the problem type of the prompt's
    instruction for samples without options and without a numeric ``answer_type``
    (None: the sample's own ``problem_type``, for project records). ``fallbacks``:
    sample → extraction fallbacks (default: all)."""

    name: str
    family: str
    scorer: Scorer
    aggregator: Aggregator = accuracy_report
    prompt_type: str | None = "free-form"
    fallbacks: Callable[[EvalSample], Sequence[str]] = _all_fallbacks
    needs_judge: bool = False
    note: str = ""
    file_prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.prompt_type is not None and self.prompt_type not in PROBLEM_TYPES:
            raise ValueError(f"benchmark {self.name}: prompt_type {self.prompt_type!r} is not "
                             f"one of {PROBLEM_TYPES}")

    def problem_type(self, sample: EvalSample) -> str:
        """The problem type whose instruction the prompt carries (never from the gold)."""
        if sample.options:
            return "multiple choice"
        if sample.extras.get("answer_type") in ("integer", "float"):
            return "numerical"
        return self.prompt_type or sample.problem_type

    def record(self, sample: EvalSample, image_dir: str | Path | None = None) -> Record:
        """The sample as a project record: hint and question as the problem, options as
        ``"A. text"`` lines, the image as a file (``image_path`` when it is one, else
        written under ``image_dir``; ``ValueError`` when an in-memory image has none)."""
        image_path = None
        if sample.images:
            if image_dir is None:
                raise ValueError(f"sample {sample.index}: its image is in memory; pass image_dir")
            image_path = sample.write_image(image_dir)
        elif sample.has_image:
            image_path = sample.image_path
        problem = f"Hint: {sample.hint}\nQuestion: {sample.question}" if sample.hint else sample.question
        return Record(
            problem_id=sample.index, problem=problem,
            data_type="image" if image_path else "text", problem_type=self.problem_type(sample),
            options=sample.option_list(), solution=f"<answer>{sample.answer}</answer>",
            answer=sample.answer, image_path=image_path, data_source=sample.source or self.name,
        )

    def prompt_text(self, sample: EvalSample, cfg: PromptConfig | None = None) -> str:
        """The user text of the prompt (``data.prompts.question_text``; no image needed)."""
        record = self.record(dataclasses.replace(sample, images=(), image_path=None))
        return question_text(record, cfg or PromptConfig())

    def extract(self, reply: str, sample: EvalSample) -> Extraction:
        letters = "".join(sample.options) or "ABCDEFGH"
        return extract_answer(reply, self.fallbacks(sample), letters)

    def score_reply(self, reply: str, sample: EvalSample) -> ScoredReply:
        extraction = self.extract(reply, sample)
        score = self.scorer(extraction.text, sample) if extraction.method != "none" else 0.0
        return ScoredReply(extraction, float(score))

    def aggregate(self, replies: Sequence[ScoredReply], samples: Sequence[EvalSample]) -> dict[str, Any]:
        """The aggregator's report plus the format-failure rate (replies not in the
        ``<think>…</think><answer>…</answer>`` format) and the extraction methods' counts."""
        report = self.aggregator([r.score for r in replies], samples)
        n = len(replies)
        report["format_failure_rate"] = sum(not r.extraction.well_formed for r in replies) / n if n else 0.0
        methods: dict[str, int] = {}
        for r in replies:
            methods[r.extraction.method] = methods.get(r.extraction.method, 0) + 1
        report["extraction"] = dict(sorted(methods.items()))
        return report


# ------------------------------------------------------------------ per-row scorers


def score_mathvista(answer: str, sample: EvalSample) -> float:
    """Multiple choice for ``multi_choice`` rows, else :func:`.scorers.score_numeric`."""
    return score_multiple_choice(answer, sample) if _is_mc(sample) else score_numeric(answer, sample)


def score_mathverse(answer: str, sample: EvalSample) -> float:
    """Multi-choice rows (options in the question text, letter answers) by letter; the
    rest numerically, else by normalised text."""
    letter_gold = re.fullmatch(r"[(\[]?[A-H][)\]]?\.?", sample.answer.strip()) is not None
    if _is_mc(sample) or "multi" in sample.extras.get("question_type", "") or letter_gold:
        return score_multiple_choice(answer, sample)
    return score_numeric(answer, sample)


def score_generic(answer: str, sample: EvalSample) -> float:
    """By the row: options → multiple choice, numerical → numeric, OCR → exp(−WER),
    else ROUGE."""
    if _is_mc(sample):
        return score_multiple_choice(answer, sample)
    if sample.problem_type == "numerical":
        return score_numeric(answer, sample)
    if sample.problem_type == "OCR":
        return score_ocr(answer, sample)
    return score_free_form(answer, sample)


def _fallbacks_by_row(sample: EvalSample) -> Sequence[str]:
    if _is_mc(sample):
        return ("boxed", "option")
    if sample.problem_type == "numerical":
        return ("boxed", "number")
    return ("boxed",)


# ------------------------------------------------------------------ the registry


_REGISTRY: dict[str, Benchmark] = {}


def register_benchmark(benchmark: Benchmark, *, replace: bool = False) -> Benchmark:
    """Add ``benchmark`` under its name (``replace=True`` to override one)."""
    key = benchmark.name.lower()
    if key in _REGISTRY and not replace:
        raise ValueError(f"benchmark {benchmark.name!r} is already registered (pass replace=True)")
    _REGISTRY[key] = benchmark
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(benchmark_names())}") from None


def benchmark_names() -> list[str]:
    return sorted(_REGISTRY)


def benchmark_for_file(path: str | Path) -> Benchmark:
    """The benchmark a file name names (longest matching prefix), else ``generic``."""
    stem = Path(path).name.lower()
    for suffix in (".tsv", ".xlsx", ".jsonl", ".json", ".parquet"):
        stem = stem.removesuffix(suffix)
    best: tuple[int, Benchmark] | None = None
    for bench in _REGISTRY.values():
        for prefix in bench.file_prefixes:
            p = prefix.lower()
            if (stem == p or re.match(re.escape(p) + r"[_\-.]", stem)) and (best is None or len(p) > best[0]):
                best = (len(p), bench)
    return best[1] if best else get_benchmark("generic")


for _bench in (
    Benchmark("mathvista", "mixed", score_mathvista, prompt_type="free-form",
              fallbacks=_fallbacks_by_row, file_prefixes=("mathvista",),
              note="deterministic extraction; the official MathVista script extracts with GPT-4 "
                   "first, so replies far from the answer format may score lower here"),
    Benchmark("mathverse", "mixed", score_mathverse, fallbacks=_fallbacks_by_row,
              needs_judge=True, file_prefixes=("mathverse",),
              note="the official MathVerse metric extracts and judges with GPT-4; this is a "
                   "deterministic approximation (letters for multi-choice, numeric otherwise)"),
    Benchmark("mmmu", "multiple choice", score_generic, fallbacks=_fallbacks_by_row,
              file_prefixes=("mmmu",), note="open questions (no options) are scored numerically or by ROUGE"),
    Benchmark("mme", "yes/no", score_yes_no, aggregator=mme_report, fallbacks=_text_fallbacks,
              file_prefixes=("mme",), note="acc, acc+ per image pair; perception/cognition sums"),
    Benchmark("chartqa", "relaxed", score_relaxed, fallbacks=_number_fallbacks,
              file_prefixes=("chartqa",), note="relaxed accuracy: numbers within 5 %"),
    Benchmark("mmbench", "multiple choice", score_multiple_choice, aggregator=circular_report,
              prompt_type="multiple choice",
              fallbacks=_mc_fallbacks, file_prefixes=("mmbench",),
              note="CircularEval accuracy reported when rotated copies (index + k*1e6) are present"),
    Benchmark("mmstar", "multiple choice", score_multiple_choice, fallbacks=_mc_fallbacks,
              prompt_type="multiple choice",
              file_prefixes=("mmstar",)),
    Benchmark("dots", "numeric", score_numeric, prompt_type=None,
              fallbacks=_number_fallbacks, file_prefixes=("dots",),
              note="the project's synthetic dots-counting task (data.visual_task)"),
    Benchmark("generic", "by row", score_generic, prompt_type=None, fallbacks=_fallbacks_by_row,
              note="per row: options -> multiple choice, numeric answer -> numeric, OCR -> "
                   "exp(-WER), else ROUGE"),
    Benchmark("exact", "exact", score_exact, prompt_type=None, fallbacks=_text_fallbacks),
):
    register_benchmark(_bench)
