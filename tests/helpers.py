"""Shared by several test modules (``pythonpath = ["tests"]`` in pyproject.toml)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mal.tokens import LayoutConfig

#: The repository (configs/, benchmarks/) and the test fixtures (the official ViL reference).
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

LAYOUT_FIELDS = {f.name for f in dataclasses.fields(LayoutConfig)}


def with_layout(kw: dict[str, Any]) -> dict[str, Any]:
    """Model overrides with the layout options (``cluster_size=2``, ...) gathered under ``layout``."""
    layout = {k: kw[k] for k in kw if k in LAYOUT_FIELDS}
    out = {k: v for k, v in kw.items() if k not in LAYOUT_FIELDS}
    return {**out, "layout": layout} if layout else out
