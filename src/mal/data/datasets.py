"""Datasets that yield ``(image, label)`` with ``image`` a ``torch.uint8`` tensor of shape ``(C, S, S)``.

Every image of one dataset has the same square size ``S = load_size`` so samples batch directly; augmentation
(crop, flip, normalize) happens later on whole batches on the device, see :class:`mal.data.BatchAugment`.

Every dataset has the attributes ``classes``, ``num_classes``, ``channels``, ``mean``, ``std`` (per channel, for pixel
values in [0, 1]) and ``load_size``, and ``targets`` (the label of every sample, in order).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")

# What PIL raises on a corrupt, truncated or unsupported file (UnidentifiedImageError is an OSError; some plugins
# raise SyntaxError or ValueError on malformed headers, EOFError on short reads).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class BadImageWarning(UserWarning):
    """Warned once per file that could not be decoded; the sample is returned as ``(None, label)``."""


def warn_bad_file(warned: set[str], key: str, message: str, err: BaseException, *, stacklevel: int = 3) -> None:
    """A :class:`BadImageWarning` ``"<message> (<error>); skipping it"``, once per ``key`` (recorded in ``warned``).
    The default ``stacklevel`` points at the caller of a ``__getitem__`` that calls this directly."""
    if key not in warned:
        warned.add(key)
        warnings.warn(f"{message} ({type(err).__name__}: {err}); skipping it", BadImageWarning, stacklevel=stacklevel)


def stratified_subset(labels: np.ndarray | list[int], fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted positions of a class-stratified ``fraction`` of ``labels``, at least one per class, fixed by ``seed``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if fraction == 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):  # sorted, so the draws do not depend on sample order
        idx = np.flatnonzero(labels == c)
        n = max(1, round(fraction * len(idx)))
        keep.append(rng.permutation(idx)[:n])
    return np.sort(np.concatenate(keep))


# ----------------------------------------------------------------------------------------------------------- digits

DIGITS_SPLITS = ("train", "val", "test")
_DIGITS_SEED = 0  # the split depends on nothing but this constant


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)  # (1797, 8, 8) in 0..16, (1797,)


@functools.lru_cache(maxsize=1)
def digits_split_indices() -> dict[str, np.ndarray]:
    """Sorted indices into ``sklearn.datasets.load_digits()`` of the fixed stratified 70/10/20 train/val/test split."""
    from sklearn.model_selection import train_test_split

    _, y = _digits_raw()
    idx = np.arange(len(y))
    trainval, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=_DIGITS_SEED)
    # 0.125 of the remaining 80% is 10% of the whole
    train, val = train_test_split(trainval, test_size=0.125, stratify=y[trainval], random_state=_DIGITS_SEED)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


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


# ------------------------------------------------------------------------------------------------------ imagefolder


def cover_crop(size: tuple[int, int], out: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Geometry of "scale to cover ``out = (H, W)``, then centre-crop" for a PIL image of ``size = (w, h)``: the
    resized ``(w, h)`` and the crop box ``(left, top, right, bottom)``."""
    (w, h), (out_h, out_w) = size, out
    scale = max(out_h / h, out_w / w)
    # max() keeps the covering side exactly the output's whatever the rounding of the other one
    new_w, new_h = max(out_w, round(w * scale)), max(out_h, round(h * scale))
    left, top = round((new_w - out_w) / 2), round((new_h - out_h) / 2)
    return (new_w, new_h), (left, top, left + out_w, top + out_h)


def load_image(path: str | os.PathLike, load_size: int) -> torch.Tensor:
    """Decode ``path`` to uint8 ``(3, S, S)``: RGB, shorter side resized to ``S`` (bicubic), center crop ``S x S``.

    Raises PIL's decoding errors (a truncated file raises, since the pixels are loaded here).
    """
    with Image.open(path) as img:
        img.load()
        img = img.convert("RGB")
    new_size, box = cover_crop(img.size, (load_size, load_size))
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.BICUBIC)
    img = img.crop(box)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """Images in ``root/<split>/<class>/<file>`` (or ``root/<class>/<file>`` when ``split`` is None).

    Classes are the sorted subfolder names (hidden folders, starting with ".", are skipped), or the names of
    ``class_to_idx`` when given (use the train split's mapping for the other splits). Files with the extensions in
    ``IMG_EXTENSIONS`` (any case) are used, sorted; other files are ignored. Samples are uint8 ``(3, S, S)``, see
    :func:`load_image`. A file that cannot be decoded is warned about once (:class:`BadImageWarning`) and returned
    as ``(None, label)``; :func:`mal.data.collate` drops it and :class:`mal.data.BadSampleCounter` (built with
    ``max_bad_fraction``) stops a run when too many are bad. ``label_fraction``/``seed`` keep a stratified fraction
    of the files (at least one per class), as in :class:`DigitsDataset`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | None = None,
        load_size: int = 256,
        max_bad_fraction: float = 0.01,
        class_to_idx: dict[str, int] | None = None,
        label_fraction: float = 1.0,
        seed: int = 0,
    ):
        if load_size < 1:
            raise ValueError(f"load_size must be positive, got {load_size}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        folder = Path(root) if split is None else Path(root) / split
        if not Path(root).is_dir():
            raise FileNotFoundError(f"dataset folder not found: {root}")
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {folder} (no split {split!r} in {root})")

        found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise ValueError(f"no class folders in {folder}; expected {folder}/<class>/<image>")
        if class_to_idx is None:
            class_to_idx = {c: i for i, c in enumerate(found)}
        else:
            unknown = [c for c in found if c not in class_to_idx]
            if unknown:
                raise ValueError(f"class folder(s) {', '.join(unknown)} in {folder} are not in the given class_to_idx")
            class_to_idx = dict(class_to_idx)

        samples: list[tuple[str, int]] = []
        for c in found:
            files = sorted(p for p in (folder / c).iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            if not files:
                raise ValueError(f"class folder {folder / c} has no images (extensions {' '.join(IMG_EXTENSIONS)})")
            samples.extend((str(p), class_to_idx[c]) for p in files)
        keep = stratified_subset([t for _, t in samples], label_fraction, seed)

        self.root = str(root)
        self.split = split
        self.folder = str(folder)
        self.load_size = int(load_size)
        self.max_bad_fraction = float(max_bad_fraction)
        self.label_fraction = float(label_fraction)
        self.class_to_idx = class_to_idx
        self.classes = sorted(class_to_idx, key=class_to_idx.__getitem__)
        self.num_classes = len(self.classes)
        self.channels = 3
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.samples = [samples[i] for i in keep]
        self.targets = [t for _, t in self.samples]
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        """``(image uint8 (3, S, S), label)``, or ``(None, label)`` when the file cannot be decoded."""
        path, label = self.samples[i]
        try:
            return load_image(path, self.load_size), label
        except _DECODE_ERRORS as e:
            warn_bad_file(self._warned, path, f"could not read image {path}", e)
            return None, label

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(folder={self.folder!r}, n={len(self)}, classes={self.num_classes}, "
            f"load_size={self.load_size})"
        )


# --------------------------------------------------------------------------------------------------------- registry

# dense.py imports this module's helpers, so it can only be imported once they are defined
from mal.data.dense import ADE20KDataset, NYUDepthV2Dataset, ProceduralScenesDataset  # noqa: E402

DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": DigitsDataset,
    "imagefolder": ImageFolderDataset,
    "nyuv2": NYUDepthV2Dataset,
    "ade20k": ADE20KDataset,
    "scenes": ProceduralScenesDataset,
}
_ROOT_HELP = {
    "imagefolder": "the folder holding <split>/<class>/<image>",
    "nyuv2": "the path of nyu_depth_v2_labeled.mat",
    "ade20k": "the ADEChallengeData2016 folder",
}


def heldout_split(name: str) -> str:
    """The split that results are reported on: ``test`` for the embedded datasets that have one (digits, scenes),
    ``val`` for the others (ImageNet-style folders, NYUv2, ADE20K)."""
    return "test" if name in ("digits", "scenes") else "val"


def build_dataset(
    name: str, split: str | None, *, root: str | os.PathLike | None = None, load_size: int | None = None, **kwargs: Any
) -> Dataset:
    """Build a registered dataset: ``digits`` and ``scenes`` (``root`` is ignored), ``imagefolder``, ``nyuv2`` and
    ``ade20k`` (need ``root``).

    ``load_size=None`` uses the dataset's default; ``kwargs`` go to the dataset class. ``label_fraction``/``seed``
    choose a labelled subset for every dataset (``scenes`` takes its generator's seed as ``scene_seed``).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(sorted(DATASETS))}")
    if load_size is not None:
        kwargs["load_size"] = load_size
    if name in _ROOT_HELP:
        if root is None:
            raise ValueError(f"dataset {name!r} needs data.root ({_ROOT_HELP[name]})")
        return DATASETS[name](root, split, **kwargs)
    return DATASETS[name](split, **kwargs)
