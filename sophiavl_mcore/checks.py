"""Small value checks shared by the config dataclasses (messages name the field)."""

from __future__ import annotations

import math
import numbers


def check_real(name: str, value: object, *, minimum: float | None = None,
               below: float | None = None) -> None:
    """Raise ValueError unless ``value`` is a finite real in [minimum, below)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if below is not None and value >= below:
        raise ValueError(f"{name} must be < {below}, got {value!r}")


def check_int(name: str, value: object) -> int:
    """Raise ValueError unless ``value`` is an integer (not a bool); returns it as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)
