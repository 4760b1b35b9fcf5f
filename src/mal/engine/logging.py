"""Run outputs: metrics as JSON lines and TensorBoard scalars, image grids as PNG (main process only)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from mal.io import atomic_write


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
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; a broken install should not stop training
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        if (step, split) in self._seen:
            return
        self._seen.add((step, split))
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "split": split, **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), step)

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


def save_image_grid(rows: dict[str, torch.Tensor], path: str | Path, *, max_images: int = 8, title: str = "") -> Path:
    """One row per entry (e.g. input / prediction / target), one column per image.

    rows: name -> (B, C, H, W) images with values in [0, 1] (C = 1 or 3). Written atomically as PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    n = min(max_images, min(t.shape[0] for t in rows.values()))
    fig, axes = plt.subplots(len(names), n, figsize=(1.4 * n, 1.5 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        imgs = rows[name][:n].detach().float().clamp(0, 1).cpu()
        for c in range(n):
            ax = axes[r][c]
            img = imgs[c]
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)
    return Path(path)
