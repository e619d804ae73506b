"""Fixtures for the distributed tests: ``dist_launch`` runs a function on N gloo processes
(see :mod:`sophiavl_mcore.testing.multiproc`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sophiavl_mcore.testing.multiproc import launch


@pytest.fixture(scope="session")
def dist_launch() -> Callable[..., list[Any]]:
    return launch
