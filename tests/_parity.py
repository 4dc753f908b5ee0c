"""The parity fixtures committed under ``tests/parity/fixtures`` (written by ``tests/parity/generate.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

FIXTURES = Path(__file__).resolve().parent / "parity" / "fixtures"


def in_repo_fixture(family: str, case: str) -> Dict[str, Any]:
    """The fixture ``<family>/<case>.pt``; an ``AssertionError`` (never a skip) when it is missing."""
    path = FIXTURES / family / f"{case}.pt"
    assert path.is_file(), f"{path} is missing: run `make parity-fixtures OFFICIAL_ROOT=...`"
    return torch.load(path, map_location="cpu", weights_only=True)
