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


# -- tiny training runs -----------------------------------------------------------------------------------------

# a model small enough for many short runs: 16 px digits, 4x4 patches, 2x2 clusters (4 clusters of 4 tokens)
TINY = [
    "model.name=mal_micro",
    "model.overrides.dim=32",
    "model.overrides.depth=1",
    "model.overrides.num_heads=2",
    "objective.decoder_dim=32",
    "objective.decoder_depth=1",
    "objective.decoder_heads=2",
    "data.image_size=16",
    "data.load_size=16",
    "optim.batch_size=16",
    "optim.warmup_epochs=0",
    "optim.blr=5e-3",
    "run.progress=false",
    "run.tensorboard=false",
    "run.image_every=null",
    "run.log_every=1",
    "run.threads=1",
]


def tiny(tmp_path: Path, *overrides: str, name: str = "run"):  # noqa: ANN201 (a PretrainConfig)
    """A tiny pretraining config writing to ``tmp_path / name``."""
    from mal.pretrain.task import load_pretrain_config

    return load_pretrain_config(None, [*TINY, f"run.out_dir={tmp_path / name}", *overrides])


def image_folder(root: Path, n_good: int, n_bad: int) -> Path:
    """An ImageFolder ``root/{train,val}/{a,b}/`` of 20 px PNGs, with ``n_bad`` unreadable files per train class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n_good):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
            for i in range(n_bad if split == "train" else 0):
                (d / f"bad{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root
