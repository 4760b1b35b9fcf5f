"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``<run>/checkpoints/step_00001234/`` holding

* ``model.safetensors``: the model's ``state_dict`` (loadable without pickle), and ``config.json``: the model's
  description (what :func:`mal.load_model` rebuilds it from; also in the safetensors metadata);
* ``state.pt``: optimizer state, step, RNG states and counters, loadable with ``torch.load(weights_only=True)``;
* ``config.yaml``: the resolved config of the run.

It is written into a hidden temporary folder, every file flushed to disk, then renamed into place in one
``os.replace``: a crash leaves either the complete folder or none (a leftover ``.tmp-*`` folder is ignored and
cleaned up at the next save).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from mal.io import STEP_DIR, latest_checkpoint, list_checkpoints, resolve_checkpoint, write_weights

__all__ = [
    "STEP_DIR",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_state",
    "load_train_state",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain Python values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": _tuples_to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_lists_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples_to_lists(x: Any) -> Any:
    return [_tuples_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _lists_to_tuples(x: Any) -> Any:
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, list) else x


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    folder: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    config_yaml: str,
    *,
    keep: int | None = None,
    model_card: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/step_<step>`` atomically and keep only the newest ``keep`` checkpoints (None: all);
    ``model_card``: the model's description (``config.json``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = folder / f"step_{step:08d}"
    tmp = folder / f".tmp-step_{step:08d}-{os.getpid()}"
    tmp.mkdir()
    try:
        write_weights(tmp, model_state, model_card, metadata={"step": str(step)})
        torch.save(train_state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        for f in tmp.iterdir():
            _fsync_file(f)
        if final.exists():  # the same step saved again (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model ``state_dict`` of a checkpoint folder (or a ``.safetensors`` file)."""
    path = Path(path)
    file = path if path.suffix == ".safetensors" else resolve_checkpoint(path) / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {file}")
    return load_file(file)


def load_train_state(path: str | Path) -> dict[str, Any]:
    return torch.load(resolve_checkpoint(path) / "state.pt", map_location="cpu", weights_only=True)
