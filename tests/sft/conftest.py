"""Fixtures for the SFT tests: one tiny Qwen2.5-VL + 32 thinking records per session
(multi-process runs use :func:`sophiavl_mcore.testing.multiproc.launch`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def sft_case(tmp_path_factory) -> dict[str, Path]:
    """``model``: tiny Qwen2.5-VL dir; ``data``: 32 thinking records with PNG images."""
    import _case

    root = tmp_path_factory.mktemp("sft_case")
    return {"model": _case.build_model(root), "data": _case.write_records(root), "root": root}
