"""Files on disk: atomic writes (write to a temporary file in the same folder, then rename over the target, so a
reader or a crash never sees a half-written file: ``os.replace`` is atomic on POSIX and Windows) and the layout of
checkpoint folders (``<run>/checkpoints/step_00001234/``), which both the engine (writing) and the model loaders
(reading) need.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Callable
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
