"""The one exception type for bad training data.

It lives in its own module (no imports) so that every loader and the record schema
(``data.schema``, whose ``ProblemTypeError`` subclasses it) raise one type.
"""

from __future__ import annotations


class RecordError(ValueError):
    """A record or data file that does not follow the schema; the message names the file,
    the record (line or index, and problem_id) and the field, with what was expected."""
