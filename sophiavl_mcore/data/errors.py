"""The exception types for bad training data: :class:`RecordError` for records,
:class:`ImageSkip` for an image a sample has to do without.

They live in their own module (no imports) so that every loader and the record schema
(``data.schema``, whose ``ProblemTypeError`` subclasses ``RecordError``) raise one type.
"""

from __future__ import annotations


class RecordError(ValueError):
    """A record or data file that does not follow the schema; the message names the file,
    the record (line or index, and problem_id) and the field, with what was expected."""


SKIP_REASONS: tuple[str, ...] = (
    "missing", "empty", "unreadable", "truncated", "too_large", "too_small", "aspect_ratio",
    "decode_error",
)


class ImageSkip(Exception):
    """An image that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
