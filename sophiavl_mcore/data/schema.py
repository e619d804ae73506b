"""What a training record and a policy reply look like: the problem types a record may
name (with the aliases of published data) and the ``<think>…</think><answer>…</answer>``
reply format (the format gate). The data loaders check records against it and the reward
functions grade replies with it; it lives under ``data/`` so neither imports the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sophiavl_mcore.data.errors import RecordError

PROBLEM_TYPES: tuple[str, ...] = ("numerical", "multiple choice", "OCR", "free-form")
# Other names for a problem type in published data: the SophiaVL-R1 release's "text"
# questions have free-text answers, graded like free-form.
PROBLEM_TYPE_ALIASES: dict[str, str] = {"text": "free-form"}

_RESPONSE_RE = re.compile(
    r"^\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*$", re.DOTALL
)


class ProblemTypeError(RecordError):
    """A record names a problem_type the reward functions do not know (a
    :class:`~sophiavl_mcore.data.errors.RecordError`, so loaders catch one type)."""


def check_problem_type(problem_type: object, where: str) -> str:
    """The canonical name of ``problem_type`` (one of :data:`PROBLEM_TYPES`; aliases in
    :data:`PROBLEM_TYPE_ALIASES` are mapped), else raise :class:`ProblemTypeError`.

    ``where`` names the record (file and record id) so that the error points at the data.
    """
    if isinstance(problem_type, str):
        problem_type = PROBLEM_TYPE_ALIASES.get(problem_type, problem_type)
    if not isinstance(problem_type, str) or problem_type not in PROBLEM_TYPES:
        accepted = [*PROBLEM_TYPES, *PROBLEM_TYPE_ALIASES]
        raise ProblemTypeError(
            f"{where}: field 'problem_type' is {problem_type!r}; expected one of "
            f"{', '.join(repr(p) for p in accepted)}"
        )
    return problem_type


@dataclass(frozen=True)
class ParsedResponse:
    """A response split into its reasoning and answer; ``well_formed`` is the format gate."""

    think: str
    answer: str
    well_formed: bool


def parse_response(text: str) -> ParsedResponse:
    """Split ``<think>…</think><answer>…</answer>``; exactly one of each, in that order."""
    match = _RESPONSE_RE.match(text)
    if match is None or "<think>" in match["think"] or "<answer>" in match["answer"]:
        return ParsedResponse(think="", answer="", well_formed=False)
    return ParsedResponse(match["think"].strip(), match["answer"].strip(), True)
