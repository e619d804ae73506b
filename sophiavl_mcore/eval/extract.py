"""The answer a reply gives, without a judge model.

Order (first that finds something wins):

1. ``answer_tag``: the reply follows the training format
   ``<think>…</think><answer>…</answer>`` (``data.schema.parse_response``: the format
   gate, ``well_formed=True``) — its answer; otherwise the content of the *last*
   ``<answer>…</answer>`` anywhere in the reply (``well_formed=False``). An answer that is
   exactly ``\\boxed{X}`` becomes ``X``.
2. ``boxed``: the content of the last ``\\boxed{…}`` (nested braces matched:
   ``\\boxed{\\frac{1}{2}}`` → ``\\frac{1}{2}``).
3. ``option``: a committed option letter — the last "answer/option/choice is (B)" /
   "answer: B", else a letter at the very end: "(C)", "C.", "… is C" (letters of
   ``letters`` only, upper case: a lower-case "a" is an article).
4. ``number``: the last number in the reply (``-3``, ``1,234.5``, ``3/4``, ``12%``).
5. ``raw``: the whole reply, stripped (free-form and yes/no scorers read it);
   ``none``: the reply is empty.

Fallbacks 2–4 can be narrowed per benchmark (``fallbacks``): a yes/no question should
not fall back to "the last number" of "there are 2 dogs, so yes".
The share of ``well_formed=False`` replies is the format-failure rate, reported apart
from accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sophiavl_mcore.data.schema import parse_response

__all__ = ["ALL_FALLBACKS", "METHODS", "Extraction", "extract_answer", "last_boxed"]

METHODS: tuple[str, ...] = ("answer_tag", "boxed", "option", "number", "raw", "none")
ALL_FALLBACKS: tuple[str, ...] = ("boxed", "option", "number")

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_WHOLE_BOXED_RE = re.compile(r"^\\boxed\s*\{(.*)\}$", re.DOTALL)
_BOXED_START_RE = re.compile(r"\\boxed\s*\{")
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?%?")
_MARKUP_RE = re.compile(r"\*\*|__|`")


@dataclass(frozen=True)
class Extraction:
    """What a reply answers: ``text`` (stripped), how it was found (``method``, one of
    :data:`METHODS`), and whether the reply followed the training format."""

    text: str
    method: str
    well_formed: bool


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` with its braces matched (None: none, or
    the last one never closes)."""
    starts = list(_BOXED_START_RE.finditer(text))
    for start in reversed(starts):
        depth, pos = 1, start.end()
        while pos < len(text):
            char = text[pos]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[start.end():pos].strip()
            pos += 1
    return None


def _commit_patterns(letters: str) -> tuple[re.Pattern[str], re.Pattern[str]]:
    group = f"[{re.escape(letters)}]"
    phrase = re.compile(
        r"(?i:\b(?:answer|option|choice)\b(?:\s+(?:is|would\s+be|should\s+be|must\s+be))?\s*[:=]?\s*"
        r"(?:option\s+|choice\s+)?)[(\[]?(" + group + r")[)\]]?(?![\w'])")
    trailing = re.compile(r"(?:^|[\s(\[:])[(\[]?(" + group + r")[)\]]?[.!]?\s*$")
    return phrase, trailing


def _option(text: str, letters: str) -> str | None:
    phrase, trailing = _commit_patterns(letters)
    plain = _MARKUP_RE.sub("", text)
    found = phrase.findall(plain)
    if found:
        return found[-1]
    end = trailing.search(plain.rstrip())
    return end[1] if end else None


def _unbox(text: str) -> str:
    whole = _WHOLE_BOXED_RE.match(text.strip())
    return whole[1].strip() if whole and last_boxed(text) == whole[1].strip() else text.strip()


def extract_answer(response: str, fallbacks: Sequence[str] = ALL_FALLBACKS,
                   letters: str = "ABCDEFGH") -> Extraction:
    """The answer of ``response`` (see the module docstring for the order).

    ``fallbacks``: which of ``boxed``, ``option``, ``number`` to try, in that order,
    when the reply has no ``<answer>`` tag; ``letters``: the option labels that count
    for ``option`` (e.g. the sample's option letters).
    """
    unknown = set(fallbacks) - set(ALL_FALLBACKS)
    if unknown:
        raise ValueError(f"unknown fallbacks {sorted(unknown)}; expected some of {ALL_FALLBACKS}")
    parsed = parse_response(response)
    if parsed.well_formed:
        return Extraction(_unbox(parsed.answer), "answer_tag", True)
    tags = _ANSWER_TAG_RE.findall(response)
    if tags:
        return Extraction(_unbox(tags[-1]), "answer_tag", False)
    if "boxed" in fallbacks:
        boxed = last_boxed(response)
        if boxed is not None:
            return Extraction(boxed, "boxed", False)
    if "option" in fallbacks and letters:
        letter = _option(response, letters)
        if letter is not None:
            return Extraction(letter, "option", False)
    if "number" in fallbacks:
        numbers = _NUMBER_RE.findall(response)
        if numbers:
            return Extraction(numbers[-1].replace(" ", ""), "number", False)
    text = response.strip()
    return Extraction(text, "raw", False) if text else Extraction("", "none", False)
