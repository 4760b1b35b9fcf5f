"""ImageNet-style folders: ``<root>/<split>/<class>/<image>``. Training samples are cropped from the full image in
the data-loader workers (:class:`~mal.data.transforms.SampleAugment`); evaluation samples are decoded and
centre-cropped to ``load_size``. Files are read by :func:`~mal.data.common.read_image`: 8-bit images as uint8,
16-bit and float images as float32 with their value range."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from mal.data.common import (
    _DECODE_ERRORS,
    IMAGENET_MEAN,
    IMAGENET_MEAN_GRAY,
    IMAGENET_STD,
    IMAGENET_STD_GRAY,
    IMG_EXTENSIONS,
    UnsupportedImageError,
    check_value_range,
    cover_crop,
    decode_image,
    image_size,
    image_tensor,
    resize_image,
    stratified_subset,
    warn_bad_file,
)
from mal.data.transforms import SampleAugment


def load_image(
    path: str | os.PathLike,
    load_size: int,
    channels: int = 3,
    value_range: Sequence[float] | None = None,
    *,
    warned: set[str] | None = None,
) -> torch.Tensor:
    """Decode ``path`` (:func:`~mal.data.common.read_image` with ``channels``, ``value_range`` and ``warned``) to
    ``(channels, S, S)``: shorter side resized to ``S`` (bicubic), center crop ``S x S``. uint8 for 8-bit files,
    float32 for wider ones.

    Raises PIL's decoding errors (a truncated file raises, since the pixels are loaded here) and
    :class:`~mal.data.common.UnsupportedImageError`.
    """
    img = decode_image(path, channels, value_range, warned=warned)
    size = image_size(img)
    new_size, (left, top, right, bottom) = cover_crop(size, (load_size, load_size))
    x = resize_image(img, new_size, Image.Resampling.BICUBIC) if new_size != size else image_tensor(img)
    return x[:, top:bottom, left:right].contiguous()


class ImageFolderDataset(Dataset):
    """Images in ``root/<split>/<class>/<file>`` (or ``root/<class>/<file>`` when ``split`` is None).

    Classes are the sorted subfolder names (hidden folders, starting with ".", are skipped), or the names of
    ``class_to_idx`` when given (use the train split's mapping for the other splits). Files with the extensions in
    ``IMG_EXTENSIONS`` (any case) are used, sorted; other files are ignored. Samples are ``(channels, S, S)``: without
    ``transform``, decoded by :func:`load_image` at ``S = load_size``; with ``transform`` (a
    :class:`~mal.data.transforms.SampleAugment`, the training split), the full image goes through it (a random crop
    from anywhere in the image, resized to ``S = transform.size``) and ``load_size`` is unused.

    Pixels (:func:`~mal.data.common.read_image`): uint8 for 8-bit files, float32 for 16-bit files (scaled by their
    type's range, ``x / 65535``) and float files (values kept); ``value_range=(lo, hi)`` maps raw values to ``(x -
    lo) / (hi - lo)`` for every file (a CT window in Hounsfield units, say), without clipping. A float file with
    values clearly outside [0, 1] and no ``value_range`` is warned about once
    (:class:`~mal.data.common.ValueRangeWarning`). A folder mixing 8-bit and wider files batches as float
    (:func:`mal.data.collate`). ``channels=3`` (colour, single-channel images replicated) or ``1`` (single-channel;
    colour images converted to luma); ``mean``/``std`` are ImageNet's, for one channel the mean of its three values.
    A file the reader cannot represent (16-bit colour) raises :class:`~mal.data.common.UnsupportedImageError`, which
    stops the run.

    Keys: an index ``i``, or ``(i, seed)`` (what the engine's ``StepSampler`` yields when :attr:`seeded_samples`):
    the transform's draws come from ``seed`` alone, not from the worker process; a plain index uses ``seed = i``.
    A file that cannot be decoded is warned about once (:class:`BadImageWarning`) and returned
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
        transform: SampleAugment | None = None,
        channels: int = 3,
        value_range: Sequence[float] | None = None,
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        value_range = check_value_range(value_range)
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
        self.channels = int(channels)
        self.value_range = value_range
        self.mean, self.std = (
            (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (IMAGENET_MEAN_GRAY, IMAGENET_STD_GRAY)
        )
        self.samples = [samples[i] for i in keep]
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self._warned: set[str] = set()

    @property
    def seeded_samples(self) -> bool:
        """Whether samples are drawn at random (a training transform): the loader should pass ``(index, seed)``."""
        return self.transform is not None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | None, int]:
        """``(image (C, S, S) uint8 or float32, label)``, or ``(None, label)`` when the file cannot be decoded."""
        i, seed = key if isinstance(key, tuple) else (key, key)
        path, label = self.samples[i]
        try:
            if self.transform is None:
                return load_image(path, self.load_size, self.channels, self.value_range, warned=self._warned), label
            img = decode_image(path, self.channels, self.value_range, warned=self._warned)
        except UnsupportedImageError:
            raise  # a format to convert, not a bad file: stop rather than skip every such file
        except _DECODE_ERRORS as e:
            warn_bad_file(self._warned, path, f"could not read image {path}", e)
            return None, label
        return self.transform(img, seed), label

    def __repr__(self) -> str:
        extra = "" if self.channels == 3 else f"channels={self.channels}, "
        extra += "" if self.value_range is None else f"value_range={list(self.value_range)}, "
        return f"ImageFolderDataset(folder={self.folder!r}, n={len(self)}, classes={self.num_classes}, {extra}" + (
            f"transform={self.transform})" if self.transform is not None else f"load_size={self.load_size})"
        )
