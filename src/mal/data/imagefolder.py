"""ImageNet-style folders: ``<root>/<split>/<class>/<image>``. Training samples are cropped from the full image in
the data-loader workers (:class:`~mal.data.transforms.SampleAugment`); evaluation samples are decoded and
centre-cropped to ``load_size``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mal.data.common import (
    _DECODE_ERRORS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_EXTENSIONS,
    cover_crop,
    stratified_subset,
    warn_bad_file,
)
from mal.data.transforms import SampleAugment


def decode_rgb(path: str | os.PathLike) -> Image.Image:
    """The whole image at ``path`` as an RGB PIL image. Raises PIL's decoding errors (a truncated file raises, since
    the pixels are loaded here)."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def load_image(path: str | os.PathLike, load_size: int) -> torch.Tensor:
    """Decode ``path`` to uint8 ``(3, S, S)``: RGB, shorter side resized to ``S`` (bicubic), center crop ``S x S``.

    Raises PIL's decoding errors (a truncated file raises, since the pixels are loaded here).
    """
    img = decode_rgb(path)
    new_size, box = cover_crop(img.size, (load_size, load_size))
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.BICUBIC)
    img = img.crop(box)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """Images in ``root/<split>/<class>/<file>`` (or ``root/<class>/<file>`` when ``split`` is None).

    Classes are the sorted subfolder names (hidden folders, starting with ".", are skipped), or the names of
    ``class_to_idx`` when given (use the train split's mapping for the other splits). Files with the extensions in
    ``IMG_EXTENSIONS`` (any case) are used, sorted; other files are ignored. Samples are uint8 ``(3, S, S)``: without
    ``transform``, decoded by :func:`load_image` at ``S = load_size``; with ``transform`` (a
    :class:`~mal.data.transforms.SampleAugment`, the training split), the full image goes through it (a random crop
    from anywhere in the image, resized to ``S = transform.size``) and ``load_size`` is unused.

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
        self.transform = transform
        self._warned: set[str] = set()

    @property
    def seeded_samples(self) -> bool:
        """Whether samples are drawn at random (a training transform): the loader should pass ``(index, seed)``."""
        return self.transform is not None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | None, int]:
        """``(image uint8 (3, S, S), label)``, or ``(None, label)`` when the file cannot be decoded."""
        i, seed = key if isinstance(key, tuple) else (key, key)
        path, label = self.samples[i]
        try:
            if self.transform is None:
                return load_image(path, self.load_size), label
            img = decode_rgb(path)
        except _DECODE_ERRORS as e:
            warn_bad_file(self._warned, path, f"could not read image {path}", e)
            return None, label
        return self.transform(img, seed), label

    def __repr__(self) -> str:
        return f"ImageFolderDataset(folder={self.folder!r}, n={len(self)}, classes={self.num_classes}, " + (
            f"transform={self.transform})" if self.transform is not None else f"load_size={self.load_size})"
        )
