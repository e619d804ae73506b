"""Package attributes imported on first use.

A package ``__init__`` that re-exports its members would otherwise import every
submodule — torch and Megatron with them — whenever any one submodule is imported;
``tools/plan.py`` (shape arithmetic on a login node) must run without torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``exports[name]`` is the module that
    defines ``name``; the value is imported on first access and cached in the package."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
