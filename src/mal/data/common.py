"""What the datasets share: the image reader, normalization constants, decode-error handling, subsets, crops, the
dense base class.

Files are decoded by :func:`read_image`, which keeps each file's value range: 8-bit files (PIL modes ``1``, ``L``,
``P``, ``RGB``, ``RGBA``, ``CMYK``, ...) give ``torch.uint8`` pixels, 16-bit files (grayscale PNG/TIFF/PGM) give
float32 scaled by their type's range (``x / 65535``), float files (TIFF mode ``F``) float32 with their values, and a
``value_range=(lo, hi)`` maps raw values to ``(x - lo) / (hi - lo)``; nothing is clipped. Everything downstream
(:func:`mal.data.collate`, :class:`mal.data.BatchAugment`, :class:`mal.data.JointAugment`) takes uint8 as
``x / 255`` and float as already in those units, so float pixels are meant to lie in [0, 1]; the reader warns once
per dataset (:class:`ValueRangeWarning`) when float values lie clearly outside it. A pixel format the reader cannot
represent (a 16-bit colour PNG, which PIL would cut to 8 bits) raises :class:`UnsupportedImageError`.

Classification datasets yield ``(image, label)`` with ``image`` a ``(C, S, S)`` tensor, uint8 or (files of more than
8 bits) float32; every image of one dataset has the same size so samples batch directly. Augmentation (crop, flip,
normalize, erasing) happens on whole batches on the device (:class:`mal.data.BatchAugment`), except for datasets
that decode files of any size (``imagefolder``): their training samples are cropped from the full image, and
RandAugment'ed, per sample in the loader workers (:class:`mal.data.SampleAugment`, keys ``(index, seed)``). Every
dataset has the attributes ``classes``, ``num_classes``, ``channels``, ``mean``, ``std`` (per channel, for pixel
values in [0, 1]) and ``load_size``.

Dense datasets (depth, semantic segmentation) yield ``(image, target)``: ``image`` ``(3, H, W)`` (uint8, or float32 as
above), ``target = {"depth": float32 (H, W), "mask": int64 (H, W)}``. Depth is in metres, 0.0 where a pixel has no
depth; the mask holds class ids ``0..num_classes-1`` and :data:`IGNORE_INDEX` for unlabelled pixels. A dataset
without depth labels gives all-zero depth, one without segmentation an all-ignore mask. Besides the attributes above
(``load_size`` an ``(H, W)`` tuple) every dense dataset has ``has_depth``, ``has_seg`` and ``max_depth`` (an upper
bound of its depths, for plots and metrics); ``label_fraction``/``seed`` keep a seeded random fraction of the samples
(at least one). Crops and flips of image, depth and mask happen together on batches (:class:`mal.data.JointAugment`).

A file that cannot be decoded (corrupt, truncated) is warned about once (:class:`BadImageWarning`) and returned with
``None`` for the image, which the collate drops.
"""

from __future__ import annotations

import bisect
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Single-channel images: the mean of ImageNet's three values
IMAGENET_MEAN_GRAY = (sum(IMAGENET_MEAN) / 3,)
IMAGENET_STD_GRAY = (sum(IMAGENET_STD) / 3,)
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


# ----------------------------------------------------------------------------------------------------------- reader


class UnsupportedImageError(ValueError):
    """A file whose pixel format :func:`read_image` cannot represent (e.g. a 16-bit colour PNG, which PIL reads as
    8-bit). Not an unreadable file: datasets let it stop the run instead of counting the sample as bad."""


class ValueRangeWarning(UserWarning):
    """Pixel values of a float (or 32-bit integer) file clearly outside [0, 1] and no ``value_range`` to map them;
    warned once per dataset."""


# PIL's modes of pixels wider than 8 bits (16- and 32-bit integers, 32-bit float): read as float32
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
# PIL unpacks these raw formats (16 bits per sample, e.g. a 16-bit colour PNG: "RGB;16B") into its 8-bit modes
_WIDE_SAMPLES = re.compile(r";16[BLN]")
_UNIT_SLACK = 0.01  # how far outside [0, 1] float values may lie before they are "clearly" outside
_RANGE_WARNED = "<value_range>"  # the key of the out-of-range warning in a dataset's warn-once record


def check_value_range(value_range: Sequence[float] | None) -> tuple[float, float] | None:
    """``value_range`` as ``(lo, hi)`` floats with ``lo < hi``, or None."""
    if value_range is None:
        return None
    span = [float(v) for v in value_range]
    if len(span) != 2 or not span[0] < span[1]:
        raise ValueError(f"value_range must be [lo, hi] with lo < hi, got {list(value_range)}")
    return span[0], span[1]


def outside_unit(lo: float, hi: float) -> bool:
    """Whether values spanning ``[lo, hi]`` lie clearly outside [0, 1] (by more than 1 % of it)."""
    return lo < -_UNIT_SLACK or hi > 1 + _UNIT_SLACK


def _rawmode(img: Image.Image) -> str:
    """The raw format of the file's first tile (e.g. ``"I;16B"``, ``"RGB;16B"``), read before ``load()`` clears it;
    ``""`` when the plugin does not say."""
    args = img.tile[0].args if img.tile else ""
    if isinstance(args, tuple):  # e.g. libtiff's (rawmode, compression, ...)
        args = args[0] if args else ""
    return args if isinstance(args, str) else ""


def _type_range(mode: str, rawmode: str) -> tuple[float, float] | None:
    """The value range of an integer pixel type of at most 16 bits (``(0, 65535)`` for 16-bit, ``(-32768, 32767)``
    signed, ``(0, 4095)`` for 12-bit TIFF), or None for float and 32-bit integer pixels (kept as values)."""
    if mode == "F":
        return None
    bits = re.match(r"I;(\d+)", rawmode)
    if bits is None:  # mode "I" of unknown depth is 32-bit; "I;16*" modes are 16-bit unsigned
        return None if mode == "I" else (0.0, 65535.0)
    n = int(bits[1])
    if n > 16:
        return None
    signed = mode == "I" and rawmode.endswith("S")
    return (-(2.0 ** (n - 1)), 2.0 ** (n - 1) - 1) if signed else (0.0, 2.0**n - 1)


def decode_image(
    path: str | os.PathLike,
    channels: int = 3,
    value_range: Sequence[float] | None = None,
    *,
    warned: set[str] | None = None,
) -> Image.Image | torch.Tensor:
    """:func:`read_image` without its last step for 8-bit files: those come back as the PIL image (mode ``RGB`` or
    ``L``), which :func:`resize_image` crops and resizes directly (turning a whole photo into a tensor and back
    would add a third to the per-sample crop's time). Every other file gives the float32 tensor of
    :func:`read_image`."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    span = check_value_range(value_range)
    with Image.open(path) as img:
        rawmode = _rawmode(img)
        img.load()
        if img.mode not in _WIDE_MODES:
            if _WIDE_SAMPLES.search(rawmode):
                raise UnsupportedImageError(
                    f"cannot read {path}: 16-bit colour or alpha samples ({rawmode}), which PIL (mode {img.mode}) "
                    "would cut to 8 bits; save it as 8-bit colour, 16-bit grayscale without alpha, or one 16-bit "
                    "grayscale or float TIFF per channel"
                )
            try:
                img = img.convert("L" if channels == 1 else "RGB")
            except ValueError as e:
                raise UnsupportedImageError(
                    f"cannot read {path}: PIL mode {img.mode} ({e}); save it as RGB, L, 16-bit grayscale or float TIFF"
                ) from None
            if span is None:
                return img
            wide, type_span = np.asarray(img, dtype=np.float32), None
        else:
            wide, type_span = np.asarray(img).astype(np.float32), _type_range(img.mode, rawmode)
        mode = img.mode
    if span is not None or type_span is not None:
        lo, hi = span or type_span
        wide = (wide - np.float32(lo)) / np.float32(hi - lo)
    elif wide.size:
        lo, hi = float(wide.min()), float(wide.max())
        if outside_unit(lo, hi) and (warned is None or _RANGE_WARNED not in warned):
            if warned is not None:
                warned.add(_RANGE_WARNED)
            warnings.warn(
                f"{path}: pixel values (mode {mode}, kept as they are) span [{lo:.6g}, {hi:.6g}], not the [0, 1] "
                "expected; set data.options.value_range=[lo, hi] to map [lo, hi] to [0, 1]"
                + (" (warned once per dataset)" if warned is not None else ""),
                ValueRangeWarning,
                stacklevel=3,
            )
    x = torch.from_numpy(wide if wide.ndim == 3 else wide[..., None]).permute(2, 0, 1).contiguous()  # (C, H, W)
    return x.expand(3, -1, -1) if channels == 3 and x.shape[0] == 1 else x


def read_image(
    path: str | os.PathLike,
    channels: int = 3,
    value_range: Sequence[float] | None = None,
    *,
    warned: set[str] | None = None,
) -> torch.Tensor:
    """The whole image at ``path`` as ``(channels, H, W)`` with its value range kept.

    8-bit files (PIL modes ``1``, ``L``, ``P``, ``RGB``, ``RGBA``, ``LA``, ``PA``, ``CMYK``, ``YCbCr``, ...) give
    uint8, PIL's ``convert("RGB")`` (``channels=3``) or ``convert("L")`` (``channels=1``: luma). Files of wider
    pixels are single-channel and give float32, replicated when ``channels=3`` (an expanded view, one copy in
    memory): integers of up to 16 bits (``I;16`` PNG/TIFF, 16-bit PGM, signed or 12-bit TIFF) scaled by their type's
    range, ``(x - min) / (max - min)``, so 16-bit ``x / 65535``; float (mode ``F``) and 32-bit integer pixels as
    they are. ``value_range=(lo, hi)`` maps the raw values (before any scaling, e.g. Hounsfield units) of every file,
    8-bit included, to ``(x - lo) / (hi - lo)``, float32. Nothing is clipped.

    Without ``value_range``, values of float and 32-bit integer files clearly outside [0, 1] are warned about
    (:class:`ValueRangeWarning`, one line naming the file and the range), once per ``warned`` (the caller's warn-once
    record, e.g. a dataset's; None: every time).
    Raises :class:`UnsupportedImageError` for a pixel format it cannot represent (16-bit colour, a mode PIL cannot
    convert), PIL's decoding errors for a corrupt or truncated file (the pixels are loaded here).
    """
    return image_tensor(decode_image(path, channels, value_range, warned=warned))


def image_size(img: Image.Image | torch.Tensor) -> tuple[int, int]:
    """``(w, h)`` (PIL's order) of a PIL image or a ``(C, H, W)`` tensor."""
    return img.size if isinstance(img, Image.Image) else (img.shape[-1], img.shape[-2])


def image_tensor(img: Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL image (mode ``L`` or ``RGB``) as uint8 ``(C, H, W)``; a tensor as it is."""
    if isinstance(img, torch.Tensor):
        return img
    x = np.asarray(img, dtype=np.uint8)
    x = x if x.ndim == 3 else x[..., None]
    return torch.from_numpy(x.copy()).permute(2, 0, 1).contiguous()


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 ``x / 255``; floating pixels (already in those units) -> float32 as they are."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.is_floating_point():
        return images.float()
    raise TypeError(f"expected uint8 (or float in [0, 1]) images, got {images.dtype}")


def resize_image(
    img: Image.Image | torch.Tensor,
    size: tuple[int, int],
    resample: Image.Resampling,
    box: tuple[float, float, float, float] | None = None,
) -> torch.Tensor:
    """PIL's ``Image.resize(size, resample, box)`` on an image of :func:`decode_image` (a PIL image, or ``(C, H, W)``
    uint8 or float), as a ``(C, h, w)`` tensor: ``size = (w, h)`` and the source region ``box = (left, top, right,
    bottom)`` as PIL's. 8-bit in, uint8 out (PIL's 8-bit resampling); float in, float32 out, each channel resampled
    as a PIL mode ``F`` image: the same filter (antialiased when shrinking) in float, not clipped."""
    if isinstance(img, Image.Image):
        return image_tensor(img.resize(size, resample, box=box))
    x = img
    if x.dtype == torch.uint8 and x.shape[0] == 3:
        return image_tensor(Image.fromarray(x.permute(1, 2, 0).numpy()).resize(size, resample, box=box))
    if x.dtype != torch.uint8:
        x = x.float()

    def plane(p: torch.Tensor) -> torch.Tensor:  # (H, W) -> (h, w), as a PIL "L" or "F" image
        return torch.from_numpy(np.asarray(Image.fromarray(p.numpy()).resize(size, resample, box=box)).copy())

    if x.shape[0] > 1 and x.stride(0) == 0:  # a replicated single channel (an expanded view) is resampled once
        return plane(x[0]).expand(x.shape[0], -1, -1)
    return torch.stack([plane(p) for p in x])


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
    """Resize the image ``(3, h, w)`` (bilinear, antialiased; uint8 rounded back to uint8, float kept float32 and not
    clipped) and ``(h, w)`` depth and mask (nearest) to ``size``."""
    h, w = image.shape[-2:]
    if (h, w) == size:
        return image, depth, mask
    x = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    image = x.round_().clamp_(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else x
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


# ----------------------------------------------------------------------------------------------------------- volumes

#: The keys of a dense target that place a 2-D slice in its 3-D volume (datasets of volumes: ``synapse``,
#: ``volumes``): the volume's number in the dataset's ``volumes`` (int64 scalar), the slice's index in it (int64
#: scalar) and the voxel spacing of the target's grid (float64 ``(3,)``, z, y, x: mm, or native voxels when unknown).
VOLUME_TAGS = ("volume", "slice", "spacing")


@dataclass(frozen=True)
class Volume:
    """One 3-D volume of a :class:`SliceDataset`: its ``name``, its slices as samples ``start .. stop - 1`` in slice
    order, and the voxel ``spacing`` (z, y, x) of the samples' label grid (mm; native voxels as 1 when unknown)."""

    name: str
    start: int
    stop: int
    spacing: tuple[float, float, float]


class SliceDataset(DenseDataset):
    """Base of the datasets of 2-D slices of 3-D volumes (``synapse``, ``volumes``): single-channel images (float32
    in [0, 1], replicated to ``channels=3`` on request), segmentation masks, no depth.

    ``volumes`` lists the split's volumes in sample order (empty for a split of separate slices, e.g. Synapse's
    training slices, or when ``label_fraction < 1`` keeps only some slices); samples of a volume carry
    :data:`VOLUME_TAGS` in their target, so that an evaluation in dataset order can stack them back into volumes
    (:class:`mal.tasks.medical.VolumeMetrics`).
    """

    channels: int = 1
    volumes: list[Volume]
    has_depth: bool = False
    has_seg: bool = True
    max_depth: float = 0.0

    def _check_channels(self, channels: int) -> int:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3 (the slice replicated), got {channels}")
        return int(channels)

    def _slice_sample(self, i: int, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, DenseTarget]:
        """``image (h, w)`` float and ``mask (h, w)`` of sample ``i`` -> ``(image float32 (C, H, W), {"depth": zeros,
        "mask": int64 (H, W), + volume tags})`` at ``load_size`` (image bilinear, mask nearest)."""
        image = image.float()[None]
        depth = torch.zeros(image.shape[-2:], dtype=torch.float32)
        image, depth, mask = resize_dense(image, depth, mask.long(), self.load_size)
        target = {"depth": depth, "mask": mask}
        if self.volumes:
            v = bisect.bisect_right(self._starts, i) - 1
            vol = self.volumes[v]
            target |= {"volume": torch.tensor(v), "slice": torch.tensor(i - vol.start),
                       "spacing": torch.tensor(vol.spacing, dtype=torch.float64)}  # fmt: skip
        return (image.expand(3, -1, -1) if self.channels == 3 else image), target

    def _set_volumes(self, volumes: list[Volume]) -> None:
        self.volumes = volumes
        self._starts = [v.start for v in volumes]


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
