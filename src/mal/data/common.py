"""What the datasets share: normalization constants, decode-error handling, subsets, crops, the dense base class.

Classification datasets yield ``(image, label)`` with ``image`` a ``torch.uint8`` tensor ``(C, S, S)``; every image of
one dataset has the same size so samples batch directly. Augmentation (crop, flip, normalize, erasing) happens on
whole batches on the device (:class:`mal.data.BatchAugment`), except for datasets that decode files of any size
(``imagefolder``): their training samples are cropped from the full image, and RandAugment'ed, per sample in the
loader workers (:class:`mal.data.SampleAugment`, keys ``(index, seed)``). Every dataset has the attributes ``classes``,
``num_classes``, ``channels``, ``mean``, ``std`` (per channel, for pixel values in [0, 1]) and ``load_size``.

Dense datasets (depth, semantic segmentation) yield ``(image, target)``: ``image`` uint8 ``(3, H, W)``, ``target =
{"depth": float32 (H, W), "mask": int64 (H, W)}``. Depth is in metres, 0.0 where a pixel has no depth; the mask
holds class ids ``0..num_classes-1`` and :data:`IGNORE_INDEX` for unlabelled pixels. A dataset without depth labels
gives all-zero depth, one without segmentation an all-ignore mask. Besides the attributes above (``load_size`` an
``(H, W)`` tuple) every dense dataset has ``has_depth``, ``has_seg`` and ``max_depth`` (an upper bound of its depths,
for plots and metrics); ``label_fraction``/``seed`` keep a seeded random fraction of the samples (at least one).
Crops and flips of image, depth and mask happen together on batches (:class:`mal.data.JointAugment`).

A file that cannot be decoded is warned about once (:class:`BadImageWarning`) and returned with ``None`` for the
image, which the collate drops.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

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


def cover_crop(size: tuple[int, int], out: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Geometry of "scale to cover ``out = (H, W)``, then centre-crop" for a PIL image of ``size = (w, h)``: the
    resized ``(w, h)`` and the crop box ``(left, top, right, bottom)``."""
    (w, h), (out_h, out_w) = size, out
    scale = max(out_h / h, out_w / w)
    # max() keeps the covering side exactly the output's whatever the rounding of the other one
    new_w, new_h = max(out_w, round(w * scale)), max(out_h, round(h * scale))
    left, top = round((new_w - out_w) / 2), round((new_h - out_h) / 2)
    return (new_w, new_h), (left, top, left + out_w, top + out_h)


IGNORE_INDEX = 255

DenseTarget = dict[str, torch.Tensor]


def as_hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``(H, W)`` from an int (square) or a pair; both must be positive."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"load_size must be positive, got {size}")
    return int(h), int(w)


def random_subset(n: int, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted positions of a random ``fraction`` of ``range(n)`` (at least one when ``n > 0``), fixed by ``seed``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0 or n == 0:
        return np.arange(n)
    keep = max(1, round(fraction * n))
    return np.sort(np.random.default_rng(seed).permutation(n)[:keep])


def _nearest_indices(src: int, dst: int) -> torch.Tensor:
    """Source index of each of ``dst`` output positions, nearest to the pixel centre (``nearest-exact``)."""
    return ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst)).floor().long().clamp_(max=src - 1)


def resize_dense(
    image: torch.Tensor, depth: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resize uint8 ``(3, h, w)`` (bilinear, antialiased) and ``(h, w)`` depth and mask (nearest) to ``size``."""
    h, w = image.shape[-2:]
    if (h, w) == size:
        return image, depth, mask
    x = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    image = x[0].round_().clamp_(0, 255).to(torch.uint8)
    rows, cols = _nearest_indices(h, size[0]), _nearest_indices(w, size[1])
    # index-based nearest keeps every value exact whatever the dtype
    return image, depth[rows][:, cols].contiguous(), mask[rows][:, cols].contiguous()


class DenseDataset(Dataset):
    """Base of the dense datasets: the shared attributes, ``len`` and the warn-once handling of unreadable files."""

    classes: tuple[str, ...]
    num_classes: int
    channels: int = 3
    mean: tuple[float, ...]
    std: tuple[float, ...]
    load_size: tuple[int, int]
    has_depth: bool
    has_seg: bool
    max_depth: float
    indices: np.ndarray  # position of every kept sample in the full split / file

    def __len__(self) -> int:
        return len(self.indices)

    def _bad(self, key: str, message: str, err: BaseException) -> tuple[None, None]:
        warn_bad_file(self.__dict__.setdefault("_warned", set()), key, message, err, stacklevel=4)  # via _bad
        return None, None

    def _blank_target(self) -> DenseTarget:
        return {
            "depth": torch.zeros(self.load_size, dtype=torch.float32),
            "mask": torch.full(self.load_size, IGNORE_INDEX, dtype=torch.int64),
        }


# ----------------------------------------------------------------------------------------------------------- concat


class DenseConcat(ConcatDataset):
    """Concatenation of dense datasets with the same ``load_size`` and ``channels`` (e.g. NYU depth + ADE20K
    segmentation in one batch). ``has_depth``/``has_seg`` are true when any part has them, ``max_depth`` is the
    largest; ``num_classes``/``classes`` are those of the part with the most classes among the parts that have
    segmentation labels (all parts when none has); ``mean``/``std`` are the first part's.
    """

    def __init__(self, datasets: Iterable[Dataset]):
        datasets = list(datasets)
        if not datasets:
            raise ValueError("DenseConcat needs at least one dataset")
        sizes = {tuple(d.load_size) for d in datasets}
        if len(sizes) > 1:
            raise ValueError(f"DenseConcat needs one load_size, got {sorted(sizes)}")
        channels = {d.channels for d in datasets}
        if len(channels) > 1:
            raise ValueError(f"DenseConcat needs one number of channels, got {sorted(channels)}")
        super().__init__(datasets)
        labelled = [d for d in datasets if d.has_seg] or datasets
        widest = max(labelled, key=lambda d: d.num_classes)
        self.classes = tuple(widest.classes)
        self.num_classes = widest.num_classes
        self.channels = datasets[0].channels
        self.load_size = tuple(datasets[0].load_size)
        self.mean, self.std = datasets[0].mean, datasets[0].std
        self.has_depth = any(d.has_depth for d in datasets)
        self.has_seg = any(d.has_seg for d in datasets)
        self.max_depth = max(d.max_depth for d in datasets)

    def __repr__(self) -> str:
        return f"DenseConcat({', '.join(repr(d) for d in self.datasets)})"
