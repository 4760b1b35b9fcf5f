"""Files on disk: atomic writes (write to a temporary file in the same folder, then rename over the target, so a
reader or a crash never sees a half-written file: ``os.replace`` is atomic on POSIX and Windows), exclusive locks on
folders (one run per run folder, one writer per checkpoint folder) and the layout of checkpoint folders
(``<run>/checkpoints/step_00001234/``), which both the engine (writing) and the model loaders (reading) need.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: A model on disk: weights, and the description a model is rebuilt from (also in the weights' metadata).
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METADATA_KEY = "mal_config"


@functools.cache
def _file_mode() -> int:
    """The mode a plain ``open()`` gives a new file: 0o666 less the process umask (0o644 with the usual 022)."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


_warned_no_plots = False


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The code a run trains with: the git commit of the checkout this package is imported from (``abc1234``, with
    ``+changes`` when its ``src/`` differs from the commit), or ``mal <version>`` outside a git checkout (an
    installed wheel). Recorded in every run's ``summary.json`` and in the rows of a sweep's ``results.csv``."""
    import subprocess

    from mal._version import __version__

    src = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return f"mal {__version__}"
    return f"{head}+changes" if dirty else head


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None when matplotlib (the ``plots`` extra) is not
    installed: figures are then skipped, with one warning per process saying how to get them."""
    global _warned_no_plots
    try:
        import matplotlib
    except ImportError:
        if not _warned_no_plots:
            _warned_no_plots = True
            print('figures are skipped: matplotlib is not installed (pip install "mal-vision[plots]")', file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def atomic_write(path: str | Path, write: Callable[[IO], None], *, mode: str = "w") -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, flush it to disk, then rename it to ``path``. The file
    gets the mode a plain ``open()`` would give it (``mkstemp``'s own is 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _file_mode())
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2))


# -- locks -------------------------------------------------------------------------------------------------------

#: The lock file of a locked folder (a run folder, a checkpoints folder); never deleted, so that every process
#: locks the same file.
LOCK_NAME = ".lock"
_HELD: dict[int, Path] = {}  # file descriptor -> lock file, of the locks this process holds


class FolderInUseError(FileExistsError):
    """Another live process holds the lock of a folder (another run writing there); the message names it."""


def _close_held_locks() -> None:
    """In a forked child (data-loader workers): drop the inherited references to the parent's locks, so that a lock
    is released the moment its holder dies, not when its last worker notices."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks)


class FolderLock:
    """An exclusive lock on a folder, held from :meth:`acquire` until :meth:`release` or the holder's death.

    ``flock(2)`` on ``<folder>/.lock``: the kernel releases it when the process dies, however it dies (kill -9
    included), so a dead run's lock is taken over without looking at pids, which containers reuse. The holder writes
    who it is into the file (pid, host, command, start time) for the message a second process gets. Locks are per
    open file, so two ``FolderLock`` of one folder exclude each other within one process too. On platforms without
    ``fcntl`` (Windows) the lock is a no-op.
    """

    def __init__(self, folder: str | Path, *, what: str = "folder") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, wait: bool = False) -> FolderLock:
        """Take the lock; ``wait=False`` raises :class:`FolderInUseError` naming the holder when another process
        holds it, ``wait=True`` blocks until it is free."""
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # no flock: nothing to hold
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise FolderInUseError(
                f"{self.folder} is in use by another {self.what} ({holder}); wait for it to end, or choose another "
                "folder"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:300]}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        _HELD[fd] = self.path
        return self

    def release(self) -> None:
        """Give the lock up (the file stays: deleting it would let two processes lock two different files)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.pop(fd, None)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last reference releases the flock

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """Who holds a lock, from what the holder wrote into the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "a process that is starting"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}: {info.get('command', '?')}"


@contextlib.contextmanager
def locked_folder(folder: str | Path, *, what: str = "folder", wait: bool = False) -> Iterator[FolderLock]:
    """``with locked_folder(path): ...``: :class:`FolderLock` as a context manager."""
    lock = FolderLock(folder, what=what).acquire(wait=wait)
    try:
        yield lock
    finally:
        lock.release()


# -- checkpoint folders ----------------------------------------------------------------------------------------

STEP_DIR = re.compile(r"^step_(\d{8})$")


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(folder: str | Path) -> Path | None:
    ckpts = list_checkpoints(folder)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a ``checkpoints`` folder or a run folder (its latest)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    for candidate in (path, path / "checkpoints"):
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no checkpoint found at {path} (expected a step_* folder with model.safetensors)")


# -- model files ---------------------------------------------------------------------------------------------------


class CorruptCheckpointError(ValueError):
    """A checkpoint or weights file cannot be read (truncated, corrupt, or not that kind of file); the message names
    the file."""


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file; :class:`CorruptCheckpointError` naming it when it cannot be read."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error type, or OSError, for a bad file)
        raise CorruptCheckpointError(f"checkpoint file {path} is corrupt or truncated ({e})") from e


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor of a ``.safetensors`` file, from its header (no tensor is read);
    :class:`CorruptCheckpointError` naming it when it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error type, or OSError, for a bad file)
        raise CorruptCheckpointError(f"checkpoint file {path} is corrupt or truncated ({e})") from e


def write_weights(
    folder: Path, state: dict[str, torch.Tensor], card: dict[str, Any] | None, metadata: dict[str, str] | None = None
) -> None:
    """``folder/model.safetensors`` (with ``card`` in its metadata) and ``folder/config.json``, each written
    atomically; the training checkpoints use it too."""
    from safetensors.torch import save as safetensors_bytes  # here: mal.io loads without torch (the CLI's start)

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = dict(metadata or {})
    if card is not None:
        text = json.dumps(card, indent=2)
        meta[METADATA_KEY] = text
        atomic_write(folder / CONFIG_NAME, lambda f: f.write(text + "\n"))
    data = safetensors_bytes(tensors, metadata=meta)
    atomic_write(folder / WEIGHTS_NAME, lambda f: f.write(data), mode="wb")


def read_weights_card(weights: str | Path) -> dict[str, Any] | None:
    """The model description of a weights file: ``config.json`` beside ``model.safetensors``, else the file's
    ``mal_config`` metadata; None when it has neither. ``ValueError`` when it is not JSON."""
    from safetensors import safe_open

    weights = Path(weights)
    beside = weights.parent / CONFIG_NAME
    if beside.is_file() and weights.name == WEIGHTS_NAME:
        text = beside.read_text()
    else:
        try:
            with safe_open(weights, framework="pt") as f:
                text = (f.metadata() or {}).get(METADATA_KEY)
        except Exception as e:  # noqa: BLE001 (safetensors' own error type for a truncated or foreign file)
            raise CorruptCheckpointError(f"weights file {weights} is corrupt or truncated ({e})") from e
    if text is None:
        return None
    try:
        card = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{weights}: unreadable model description ({e})") from e
    if not isinstance(card, dict):
        raise ValueError(f"{weights}: the model description is not a JSON object")
    return card
