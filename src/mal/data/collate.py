"""Batching (classification, dense, detection) that drops unreadable samples, and a counter that stops a run when
too many are unreadable."""

from __future__ import annotations

from typing import Any

import torch

from mal.data.common import VOLUME_TAGS, unit_float


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """``(C, H, W)`` images -> ``(B, C, H, W)``: uint8 when every image is, otherwise float32 in the units of float
    pixels (uint8 as ``x / 255``), so a folder mixing 8-bit and 16-bit files batches."""
    if all(x.dtype == torch.uint8 for x in images):
        return torch.stack(images)
    return torch.stack([unit_float(x) for x in images])


def collate(batch: list[tuple[torch.Tensor | None, Any]]) -> dict[str, Any]:
    """``DataLoader`` ``collate_fn``: stack the good samples, drop the ``(None, label)`` ones and count them.

    Returns ``{"images": uint8 (B, C, S, S), "labels": int64 (B,), "num_bad": int}`` with ``B`` the number of good
    samples. When every sample is bad, ``images`` is ``None`` and ``labels`` is an empty int64 tensor: skip the batch.
    Images are float32 when any sample's is (files of more than 8 bits), uint8 ones then as ``x / 255``
    (:func:`stack_images`).

    Dense samples (the target a dict, bad ones ``(None, None)``) give ``{"images": uint8 (B, C, H, W), "labels":
    None, "depth": float32 (B, H, W), "mask": int64 (B, H, W), "num_bad": int}``; when every sample is bad,
    ``images``, ``depth`` and ``mask`` are ``None``. Slices of volumes add :data:`VOLUME_TAGS` (``volume`` and
    ``slice`` ``(B,)``, ``spacing`` ``(B, 3)``) when every sample has them.

    Detection samples (the target a dict with ``"boxes"``, see :mod:`mal.data.coco`) give ``{"images": list of (3,
    H_i, W_i), "targets": list of dicts, "labels": None, "num_bad": int}``, unstacked (sizes differ). A batch of
    nothing but bad samples cannot tell dense from detection and comes back in the dense form, ``images`` None.
    """
    if any(isinstance(target, dict) and "boxes" in target for _, target in batch):
        good = [(img, target) for img, target in batch if img is not None and target is not None]
        return {
            "images": [img for img, _ in good] or None,
            "targets": [target for _, target in good],
            "labels": None,
            "num_bad": len(batch) - len(good),
        }
    if any(target is None or isinstance(target, dict) for _, target in batch):
        return _collate_dense(batch)
    good = [(img, label) for img, label in batch if img is not None]
    num_bad = len(batch) - len(good)
    if not good:
        return {"images": None, "labels": torch.zeros(0, dtype=torch.int64), "num_bad": num_bad}
    images = stack_images([img for img, _ in good])
    labels = torch.tensor([int(label) for _, label in good], dtype=torch.int64)
    return {"images": images, "labels": labels, "num_bad": num_bad}


def _collate_dense(batch: list[tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]]) -> dict[str, Any]:
    good = [(img, target) for img, target in batch if img is not None and target is not None]
    num_bad = len(batch) - len(good)
    if not good:
        return {"images": None, "labels": None, "depth": None, "mask": None, "num_bad": num_bad}
    out = {
        "images": stack_images([img for img, _ in good]),
        "labels": None,
        "depth": torch.stack([t["depth"] for _, t in good]).float(),
        "mask": torch.stack([t["mask"] for _, t in good]).long(),
        "num_bad": num_bad,
    }
    # slices of 3-D volumes (synapse, volumes) carry their place in the volume for the per-volume metrics; a batch
    # that mixes them with other samples drops the tags
    if all("volume" in t for _, t in good):
        out |= {k: torch.stack([t[k] for _, t in good]) for k in VOLUME_TAGS}
    return out


class BadDataLimit(RuntimeError):
    """More images could not be read than ``max_bad_fraction`` allows (raised by :meth:`BadSampleCounter.check`)."""


class BadSampleCounter:
    """Counts good and unreadable samples over a run and judges them against ``max_fraction``.

    The fraction is of the data, not of the first few batches: the run stops when ``bad > max_fraction *
    max(seen, population)``, with ``population`` the size of the training set. In the first epoch that means more
    bad files than the whole data set may hold (a single bad file among hundreds at 1% never stops a run, however
    early it comes); later, more than ``max_fraction`` of what was read. ``max_fraction == 0`` stops at the first
    bad sample. :meth:`add` counts, :meth:`check` judges (the engine adds the counts of every process first).
    Save ``state_dict()`` in checkpoints so a resumed run keeps its counts.
    """

    def __init__(self, max_fraction: float, population: int = 0):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction = float(max_fraction)
        self.population = int(population)
        self.good = 0
        self.bad = 0

    @property
    def seen(self) -> int:
        return self.good + self.bad

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def add(self, num_good: int, num_bad: int) -> None:
        """Add one batch's counts (e.g. ``len(batch["labels"])`` and ``batch["num_bad"]``)."""
        self.good += int(num_good)
        self.bad += int(num_bad)

    def update(self, num_good: int, num_bad: int) -> None:
        """:meth:`add`, then :meth:`check`."""
        self.add(num_good, num_bad)
        self.check()

    @property
    def over(self) -> bool:
        """Whether more images were unreadable than allowed."""
        if self.bad == 0:
            return False
        return self.max_fraction == 0 or self.bad > self.max_fraction * max(self.seen, self.population)

    def check(self) -> None:
        """Raise :class:`BadDataLimit` if more images were unreadable than allowed."""
        if self.over:
            raise BadDataLimit(
                f"{self.bad} of {self.seen} images could not be read ({100 * self.fraction:.2f}%), more than the "
                f"allowed data.max_bad_fraction={self.max_fraction} of the {self.population or self.seen} images; "
                "see the warnings for the files"
            )

    def state_dict(self) -> dict[str, int]:
        return {"good": self.good, "bad": self.bad}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.good = int(state["good"])
        self.bad = int(state["bad"])

    def __repr__(self) -> str:
        return (
            f"BadSampleCounter(good={self.good}, bad={self.bad}, max_fraction={self.max_fraction}, "
            f"population={self.population})"
        )
