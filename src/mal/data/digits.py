"""The 8x8 digits, the embedded default data: fixed train / val / test splits, upsampled to ``load_size``.

The 1797 images are the UCI "Optical Recognition of Handwritten Digits" test set (E. Alpaydin, C. Kaynak, 1998;
CC BY 4.0) as scikit-learn's ``load_digits`` returns them, shipped in ``digits.npz`` with the split, so that the
core needs no scikit-learn; ``tests/data`` checks the file against scikit-learn where it is installed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mal.data.common import stratified_subset

DIGITS_SPLITS = ("train", "val", "test")


#: The 1797 digits (uint8 values 0..16, their labels) and the fixed split, shipped with the package (50 KB).
DIGITS_FILE = Path(__file__).with_name("digits.npz")


@functools.lru_cache(maxsize=1)
def _digits_file() -> dict[str, np.ndarray]:
    with np.load(DIGITS_FILE, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """``(1797, 8, 8)`` float32 images in 0..16 and ``(1797,)`` int64 labels, in ``load_digits()``'s order."""
    f = _digits_file()
    return f["images"].astype(np.float32), f["targets"].astype(np.int64)


@functools.lru_cache(maxsize=1)
def digits_split_indices() -> dict[str, np.ndarray]:
    """Sorted indices into the 1797 digits of the fixed stratified 70/10/20 train/val/test split (made once with
    scikit-learn's ``train_test_split``, seed 0, and shipped with the data)."""
    f = _digits_file()
    return {split: f[split].astype(np.int64) for split in DIGITS_SPLITS}


@functools.lru_cache(maxsize=2)
def _digits_images(load_size: int) -> torch.Tensor:
    """All 1797 digits as uint8 ``(N, 1, load_size, load_size)``: 0..16 scaled to 0..255, bilinear upsampling."""
    images, _ = _digits_raw()
    x = torch.from_numpy(images).unsqueeze(1) * (255.0 / 16.0)
    if load_size != x.shape[-1]:
        x = F.interpolate(x, size=(load_size, load_size), mode="bilinear", align_corners=False, antialias=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=8)
def digits_stats(load_size: int) -> tuple[tuple[float], tuple[float]]:
    """``(mean, std)`` of the digits train split at ``load_size``, for pixel values in [0, 1] (one channel)."""
    x = _digits_images(load_size)[torch.from_numpy(digits_split_indices()["train"])].double() / 255.0
    return (x.mean().item(),), (x.std(unbiased=False).item(),)


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits (1797 grey images, 10 classes), upsampled to ``(1, load_size, load_size)`` uint8.

    The split is a fixed stratified 70/10/20 train/val/test split (seeded by a constant). ``label_fraction`` keeps a
    stratified fraction of the split (at least one image per class), chosen by ``seed``, for few-label fine-tuning;
    ``subset_fraction`` is an alias of it. ``indices`` holds the positions in ``load_digits()`` of the kept images.
    """

    def __init__(
        self,
        split: str,
        load_size: int = 32,
        label_fraction: float = 1.0,
        seed: int = 0,
        subset_fraction: float | None = None,
    ):
        if split not in DIGITS_SPLITS:
            raise ValueError(f"unknown digits split {split!r}; valid splits: {', '.join(DIGITS_SPLITS)}")
        if load_size < 1:
            raise ValueError(f"load_size must be positive, got {load_size}")
        if subset_fraction is not None:
            if label_fraction != 1.0 and label_fraction != subset_fraction:
                raise ValueError("give label_fraction or subset_fraction (its alias), not both")
            label_fraction = subset_fraction
        _, y = _digits_raw()
        indices = digits_split_indices()[split]
        indices = indices[stratified_subset(y[indices], label_fraction, seed)]

        self.split = split
        self.load_size = int(load_size)
        self.label_fraction = float(label_fraction)
        self.indices = indices
        self.images = _digits_images(self.load_size)[torch.from_numpy(indices)]  # (N, 1, S, S) uint8
        self.targets = [int(t) for t in y[indices]]
        self.classes = [str(i) for i in range(10)]
        self.num_classes = 10
        self.channels = 1
        self.mean, self.std = digits_stats(self.load_size)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """``(image uint8 (1, S, S), label)``."""
        return self.images[i], self.targets[i]

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, n={len(self)}, load_size={self.load_size})"
