"""Run outputs: metrics as JSON lines and TensorBoard scalars, image grids as PNG (main process only)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from pathlib import Path

import torch

from mal.io import atomic_write, pyplot


class MetricLogger:
    """Appends ``{"step": .., "split": .., **metrics}`` lines to ``metrics.jsonl`` and mirrors them to TensorBoard.

    On resume, lines with a step beyond the checkpoint's are dropped first, so the file never holds two
    histories for the same steps, and a row already logged for a (step, split) is not logged again (a finished run
    resumed evaluates its last step again). A partial last line (a kill during a write) is dropped with a warning.
    """

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seen: set[tuple[int, str]] = set()
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            self._seen = {(r["step"], r.get("split", "train")) for r in kept}
            atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept)))
        elif resume_step is None:
            atomic_write(self.path, lambda f: f.write(""))
        self._file = self.path.open("ab", buffering=0)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # an optional extra: its absence should not stop a run
                warnings.warn(
                    'TensorBoard logs are off: tensorboard is not installed (pip install "mal-vision[tensorboard]", or '
                    "set run.tensorboard=false)",
                    stacklevel=2,
                )
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        if (step, split) in self._seen:
            return
        self._seen.add((step, split))
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()}
        self._append(json.dumps({"step": step, "split": split, **clean}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), step)

    def _append(self, line: str) -> None:
        """Append one whole line (unbuffered): a write that fails half-way (a full disk) is cut back off, so the
        file never ends in a partial row, and the error names the file."""
        data = line.encode()
        start = os.fstat(self._file.fileno()).st_size
        try:
            done = 0
            while done < len(data):
                done += self._file.write(data[done:])
        except OSError as e:
            with contextlib.suppress(OSError):
                os.truncate(self.path, start)
            raise OSError(e.errno, f"cannot write metrics: {e.strerror or e}", str(self.path)) from e

    def log_image(self, tag: str, path: str | Path, step: int) -> None:
        """A PNG written by the run (e.g. a reconstruction grid) into TensorBoard as well."""
        if self._tb is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as img:
                self._tb.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")

    def log_hparams(self, config: dict, metrics: dict[str, float]) -> None:
        """The run's config (flattened) and its final metrics, in TensorBoard's hyperparameter view."""
        if self._tb is not None:
            from mal.config import flatten

            flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flatten(config).items()}
            self._tb.add_hparams(flat, {f"hparam/{k}": float(v) for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path, split: str | None = None) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file (optionally of one split). A partial last line (a write cut short) is
    skipped with a warning; an unreadable line before it is a ``ValueError`` naming the file and the line."""
    path = Path(path)
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines, start=1):
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if i < len(lines):
                raise ValueError(f"{path}, line {i}: not a JSON metrics row ({e})") from e
            warnings.warn(f"{path}: skipping a partial last line (a write cut short)", stacklevel=2)
    return [r for r in rows if split is None or r.get("split") == split]


def save_image_grid(
    rows: dict[str, torch.Tensor], path: str | Path, *, max_images: int = 8, title: str = "",
    heat: dict[str, str] | None = None,
) -> Path | None:  # fmt: skip
    """One row per entry (e.g. input / prediction / target), one column per image.

    rows: name -> (B, C, H, W) images with values in [0, 1] (C = 1 or 3). ``heat``: rows drawn as a heat map of the
    mean over channels (e.g. ``{"|error|": "absolute error (pixel value)"}``), from 0 to the row's maximum, with a
    colour bar labelled with the given text. Written atomically as PNG.
    """
    plt = pyplot()
    if plt is None:
        return None

    heat = heat or {}
    names = list(rows)
    n = min(max_images, min(t.shape[0] for t in rows.values()))
    fig, axes = plt.subplots(len(names), n, figsize=(1.4 * n + (1.2 if heat else 0), 1.5 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        imgs = rows[name][:n].detach().float().cpu()
        vmax = float(imgs.mean(1).max()) if name in heat else 1.0
        shown = None
        for c in range(n):
            ax = axes[r][c]
            img = imgs[c]
            if name in heat:
                shown = ax.imshow(img.mean(0).numpy(), cmap="magma", vmin=0.0, vmax=max(vmax, 1e-6))
            elif img.shape[0] == 1:
                ax.imshow(img[0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
        if shown is not None:
            bar = fig.colorbar(shown, ax=list(axes[r]), fraction=0.02, pad=0.01)
            bar.set_label(heat[name], fontsize=7)
            bar.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    if not heat:
        fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)
    return Path(path)
