"""Atomic checkpoints and exact resume.

A checkpoint is a folder ``<run>/checkpoints/step_00001234/`` holding

* ``model.safetensors``: the model's ``state_dict`` (loadable without pickle), and ``config.json``: the model's
  description (what :func:`mal.load_model` rebuilds it from; also in the safetensors metadata);
* ``state.pt``: optimizer state, step, RNG states and counters, loadable with ``torch.load(weights_only=True)``;
* ``config.yaml``: the resolved config of the run.

What survives a crash or a kill at any point of a save (``docs/PRETRAINING.md``, "What survives what"):

* a checkpoint is written into a hidden ``.tmp-step_X-<pid>`` folder, every file flushed to disk, a ``complete``
  marker last, then renamed into place; a half-written folder is never a checkpoint;
* a checkpoint is replaced (the same step saved again) only after its successor is complete: the old folder is
  renamed aside (``.old-step_X-<pid>``), the new one renamed into place, and only then the old one deleted;
* :func:`recover` (run before every save and every resume) finishes an interrupted save: a complete temporary
  folder whose step is missing is renamed into place, an old folder whose step is missing is restored, the rest of
  the leftovers of dead processes are deleted;
* retention (``keep``) counts complete checkpoints only and never deletes the newest one.

Reading: a corrupt or truncated file raises :class:`CorruptCheckpointError` naming it;
:func:`loadable_checkpoints` lists what a resume may fall back to.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mal.io import (
    STEP_DIR,
    CorruptCheckpointError,
    latest_checkpoint,
    list_checkpoints,
    read_safetensors,
    resolve_checkpoint,
    write_weights,
)

__all__ = [
    "STEP_DIR",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "loadable_checkpoints",
    "recover",
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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (no space left, no permission, ...); the message names the folder and the
    cause. The checkpoints written before are untouched."""


COMPLETE = "complete"  # marker written last into a temporary checkpoint folder
_LEFTOVER = re.compile(r"^\.(tmp|old)-step_(\d{8})-(\d+)$")


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def recover(folder: str | Path) -> list[str]:
    """Finish or clean up the saves of dead processes in ``folder``; returns what was done (one line each).

    A complete ``.tmp-step_X-*`` whose ``step_X`` is missing becomes ``step_X``; an ``.old-step_X-*`` (a replaced
    checkpoint) becomes ``step_X`` again when ``step_X`` is missing, else it is deleted; incomplete temporary
    folders are deleted. Leftovers of live processes (another run writing here) are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done: list[str] = []
    leftovers = sorted(((m, p) for p in folder.iterdir() if (m := _LEFTOVER.match(p.name))), key=lambda mp: mp[1].name)
    for kind in ("tmp", "old"):  # a complete new folder wins over the old one it was replacing
        for m, path in [(m, p) for m, p in leftovers if m[1] == kind]:
            if _alive(int(m[3])) or not path.exists():
                continue
            final = folder / f"step_{m[2]}"
            usable = kind == "old" or (path / COMPLETE).is_file()
            if usable and not final.exists():
                os.replace(path, final)
                done.append(f"{'completed the save of' if kind == 'tmp' else 'restored'} {final}")
            else:
                shutil.rmtree(path, ignore_errors=True)
    if done:
        _fsync(folder)
    return done


def save_checkpoint(
    folder: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    config_yaml: str,
    *,
    keep: int | None = None,
    model_card: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """Write ``folder/step_<step>`` (or ``folder/<name>``: a labelled state that is not a checkpoint to resume
    from, e.g. ``diverged_step_<step>``) crash-safely and keep only the newest ``keep`` checkpoints (None: all).
    ``model_card``: the model's description (``config.json``). Raises :class:`CheckpointWriteError` with the
    cause when the folder cannot be written; nothing written before is lost."""
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 (the newest checkpoint is always kept), got {keep}")
    folder = Path(folder)
    final = folder / (name or f"step_{step:08d}")
    tmp = folder / f".tmp-step_{step:08d}-{os.getpid()}"
    old = folder / f".old-step_{step:08d}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        recover(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_weights(tmp, model_state, model_card, metadata={"step": str(step)})
        torch.save(train_state, tmp / "state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        for f in tmp.iterdir():
            _fsync(f)
        (tmp / COMPLETE).write_text(f"{step}\n")
        _fsync(tmp / COMPLETE)
        _fsync(tmp)
        if final.exists():  # the same step saved again: the old folder goes only once the new one is in place
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(folder)
    except BaseException as e:
        if tmp.exists() and not (tmp / COMPLETE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)  # put the replaced checkpoint back
        if isinstance(e, OSError | RuntimeError) and not isinstance(e, CheckpointWriteError):
            raise CheckpointWriteError(write_failure(final, e)) from e
        raise
    shutil.rmtree(old, ignore_errors=True)
    if keep is not None and name is None:
        for stale in list_checkpoints(folder)[:-keep]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    return final


def write_failure(path: Path, err: BaseException) -> str:
    """One line saying why ``path`` could not be written: no space left, no permission, or the error itself."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    text = str(err)
    if getattr(err, "errno", None) == errno.ENOSPC or "unexpected pos" in text or free < 16 * 2**20:
        return f"cannot write checkpoint {path}: no space left on the device ({free / 2**20:.0f} MiB free)"
    if isinstance(err, PermissionError) or getattr(err, "errno", None) in (errno.EACCES, errno.EROFS):
        return f"cannot write checkpoint {path}: permission denied ({text})"
    return f"cannot write checkpoint {path}: {type(err).__name__}: {text}"


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model ``state_dict`` of a checkpoint folder (or a ``.safetensors`` file); :class:`CorruptCheckpointError`
    naming the file when it cannot be read."""
    path = Path(path)
    file = path if path.suffix == ".safetensors" else resolve_checkpoint(path) / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {file}")
    return read_safetensors(file)


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The training state (``state.pt``) of a checkpoint; :class:`CorruptCheckpointError` naming the file when it
    cannot be read."""
    file = resolve_checkpoint(path) / "state.pt"
    if not file.is_file():
        raise CorruptCheckpointError(f"checkpoint file {file} is missing")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load raises many kinds for a truncated or foreign file)
        raise CorruptCheckpointError(f"checkpoint file {file} is corrupt or truncated ({type(e).__name__}: {e})") from e


def loadable_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, newest first (what a resume tries in turn)."""
    return list(reversed(list_checkpoints(folder)))
