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
* one process writes into a checkpoints folder at a time (:class:`~mal.io.FolderLock` on ``checkpoints/.lock``,
  held during a save), so every leftover found while holding the lock is a dead writer's, whatever its pid (pids
  are reused);
* :func:`recover` (run before every save and every resume) finishes an interrupted save: a complete temporary
  folder whose step is missing is renamed into place, an old folder whose step is missing is restored, the rest of
  the leftovers of dead processes are deleted;
* retention (``keep``) counts complete checkpoints only, never deletes the newest one, and never deletes one newer
  than the checkpoint just written (a resume from an older checkpoint leaves the newer ones alone; an unreadable one
  is set aside by :func:`set_aside`).

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
    FolderInUseError,
    FolderLock,
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
    "set_aside",
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


def recover(folder: str | Path) -> list[str]:
    """Finish or clean up the saves of dead processes in ``folder``; returns what was done (one line each).

    A complete ``.tmp-step_X-*`` whose ``step_X`` is missing becomes ``step_X``; an ``.old-step_X-*`` (a replaced
    checkpoint) becomes ``step_X`` again when ``step_X`` is missing, else it is deleted; incomplete temporary
    folders are deleted. While another process is saving into ``folder`` (it holds the folder's lock) nothing is
    touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    lock = FolderLock(folder, what="checkpoint writer")
    try:
        lock.acquire()
    except FolderInUseError:
        return []
    try:
        return _recover_locked(folder)
    finally:
        lock.release()


def _recover_locked(folder: Path) -> list[str]:
    """:func:`recover` with the folder's lock held: every leftover is a dead writer's."""
    done: list[str] = []
    leftovers = sorted(((m, p) for p in folder.iterdir() if (m := _LEFTOVER.match(p.name))), key=lambda mp: mp[1].name)
    for kind in ("tmp", "old"):  # a complete new folder wins over the old one it was replacing
        for m, path in [(m, p) for m, p in leftovers if m[1] == kind]:
            if not path.exists():
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


def set_aside(checkpoint: str | Path, reason: str = "corrupt") -> Path:
    """Rename a checkpoint that must not be resumed from (e.g. an unreadable one) to ``<reason>_step_X`` beside it:
    kept for inspection, no longer a checkpoint (resume and retention skip it). Returns the new path."""
    checkpoint = Path(checkpoint)
    target = checkpoint.with_name(f"{reason}_{checkpoint.name}")
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"{reason}{n}_{checkpoint.name}")
    os.replace(checkpoint, target)
    return target


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
    lock = FolderLock(folder, what="checkpoint writer")
    current = tmp
    try:
        lock.acquire(wait=True)  # one writer at a time; another process's save takes seconds
        _recover_locked(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        current = tmp / "model.safetensors"
        write_weights(tmp, model_state, model_card, metadata={"step": str(step)})
        current = tmp / "state.pt"
        torch.save(train_state, current)
        current = tmp / "config.yaml"
        current.write_text(config_yaml)
        current = tmp
        for f in tmp.iterdir():
            _fsync(f)
        (tmp / COMPLETE).write_text(f"{step}\n")
        _fsync(tmp / COMPLETE)
        _fsync(tmp)
        if final.exists():  # the same step saved again: the old folder goes only once the new one is in place
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(folder)
        shutil.rmtree(old, ignore_errors=True)
        if keep is not None and name is None:
            older = [c for c in list_checkpoints(folder) if int(STEP_DIR.match(c.name)[1]) < step]
            for stale in older[: max(0, len(older) - (keep - 1))]:
                shutil.rmtree(stale, ignore_errors=True)
    except BaseException as e:
        if tmp.exists() and not (tmp / COMPLETE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)  # put the replaced checkpoint back
        if isinstance(e, OSError | RuntimeError) and not isinstance(e, CheckpointWriteError):
            raise CheckpointWriteError(write_failure(final, e, current)) from e
        raise
    finally:
        lock.release()
    return final


def write_failure(path: Path, err: BaseException, file: Path | None = None) -> str:
    """One line saying why checkpoint ``path`` could not be written, naming the ``file`` being written: no space
    left, a quota, the file-size limit (``ulimit -f``), no permission, or the error itself."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    code = _errno(err)
    text = str(err)
    named = file is not None and file.name in ("model.safetensors", "config.json", "state.pt", "config.yaml")
    where = f"cannot write checkpoint {path}" + (f" (file {file.name})" if named else "")
    limit = file_size_limit()
    # torch.save reports a short write as "unexpected pos" without the errno: tell the causes apart by the state
    short_write = "unexpected pos" in text
    if code == errno.EFBIG or (short_write and limit is not None and free >= 16 * 2**20):
        what = human_size(limit) if limit is not None else "a limit of the file system"
        return f"{where}: file too large (the file-size limit, ulimit -f, is {what}; {human_size(free)} free)"
    if code == errno.EDQUOT:
        return f"{where}: disk quota exceeded ({human_size(free)} free on the device)"
    if code == errno.ENOSPC or short_write or free < 16 * 2**20:
        return f"{where}: no space left on the device ({human_size(free)} free)"
    if isinstance(err, PermissionError) or code in (errno.EACCES, errno.EROFS):
        return f"{where}: permission denied ({text})"
    return f"{where}: {type(err).__name__}: {text}"


def human_size(n: float) -> str:
    """``n`` bytes as ``"64 KiB"``, ``"1.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if n == int(n) or n >= 100 else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _errno(err: BaseException) -> int | None:
    """The errno of ``err`` or of an OSError it was raised from."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) is not None:
            return err.errno
        err = err.__cause__ or err.__context__
    return None


def file_size_limit() -> int | None:
    """The process's file-size limit in bytes (``ulimit -f``), None when unlimited or unknown."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


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
