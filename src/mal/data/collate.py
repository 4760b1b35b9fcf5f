"""Batching that drops unreadable samples, and a counter that stops a run when too many are unreadable."""

from __future__ import annotations

from typing import Any

import torch


def collate(batch: list[tuple[torch.Tensor | None, Any]]) -> dict[str, Any]:
    """``DataLoader`` ``collate_fn``: stack the good samples, drop the ``(None, label)`` ones and count them.

    Returns ``{"images": uint8 (B, C, S, S), "labels": int64 (B,), "num_bad": int}`` with ``B`` the number of good
    samples. When every sample is bad, ``images`` is ``None`` and ``labels`` is an empty int64 tensor: skip the batch.

    Dense samples (the target a dict, bad ones ``(None, None)``) give ``{"images": uint8 (B, C, H, W), "labels":
    None, "depth": float32 (B, H, W), "mask": int64 (B, H, W), "num_bad": int}``; when every sample is bad,
    ``images``, ``depth`` and ``mask`` are ``None``.
    """
    if any(target is None or isinstance(target, dict) for _, target in batch):
        return _collate_dense(batch)
    good = [(img, label) for img, label in batch if img is not None]
    num_bad = len(batch) - len(good)
    if not good:
        return {"images": None, "labels": torch.zeros(0, dtype=torch.int64), "num_bad": num_bad}
    images = torch.stack([img for img, _ in good])
    labels = torch.tensor([int(label) for _, label in good], dtype=torch.int64)
    return {"images": images, "labels": labels, "num_bad": num_bad}


def _collate_dense(batch: list[tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]]) -> dict[str, Any]:
    good = [(img, target) for img, target in batch if img is not None and target is not None]
    num_bad = len(batch) - len(good)
    if not good:
        return {"images": None, "labels": None, "depth": None, "mask": None, "num_bad": num_bad}
    return {
        "images": torch.stack([img for img, _ in good]),
        "labels": None,
        "depth": torch.stack([t["depth"] for _, t in good]).float(),
        "mask": torch.stack([t["mask"] for _, t in good]).long(),
        "num_bad": num_bad,
    }


class BadSampleCounter:
    """Counts good and unreadable samples over a run; raises ``RuntimeError`` when too many are unreadable.

    :meth:`update` raises when ``bad / (good + bad) > max_fraction`` once at least ``min_seen`` samples were seen
    (so a few bad files early on do not stop a run), and at the first bad sample when ``max_fraction == 0``.
    Save ``state_dict()`` in checkpoints so a resumed run keeps its counts.
    """

    def __init__(self, max_fraction: float, min_seen: int = 50):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction = float(max_fraction)
        self.min_seen = int(min_seen)
        self.good = 0
        self.bad = 0

    @property
    def seen(self) -> int:
        return self.good + self.bad

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def update(self, num_good: int, num_bad: int) -> None:
        """Add one batch's counts (e.g. ``len(batch["labels"])`` and ``batch["num_bad"]``), then :meth:`check`."""
        self.good += int(num_good)
        self.bad += int(num_bad)
        self.check()

    def check(self, final: bool = False) -> None:
        """Raise if the bad fraction is over the limit; ``final=True`` (end of a pass) ignores ``min_seen``."""
        if self.bad == 0:
            return
        over = self.max_fraction == 0 or ((final or self.seen >= self.min_seen) and self.fraction > self.max_fraction)
        if over:
            raise RuntimeError(
                f"{self.bad} of {self.seen} images could not be read ({100 * self.fraction:.2f}%), more than the "
                f"allowed max_bad_fraction={self.max_fraction}; see the warnings for the files"
            )

    def state_dict(self) -> dict[str, int]:
        return {"good": self.good, "bad": self.bad}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.good = int(state["good"])
        self.bad = int(state["bad"])

    def __repr__(self) -> str:
        return f"BadSampleCounter(good={self.good}, bad={self.bad}, max_fraction={self.max_fraction})"
