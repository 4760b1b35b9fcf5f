"""Datasets for dense tasks (depth, semantic segmentation): NYU Depth v2, ADE20K and procedural scenes.

A sample is ``(image, target)``: ``image`` uint8 ``(3, H, W)``, ``target = {"depth": float32 (H, W), "mask": int64
(H, W)}``. Depth is in metres, 0.0 where a pixel has no depth; the mask holds class ids ``0..num_classes-1`` and
``IGNORE_INDEX = 255`` for unlabelled pixels. A dataset without depth labels gives all-zero depth, one without
segmentation an all-255 mask. Every sample of a dataset has ``(H, W) = load_size``, so samples batch directly with
:func:`mal.data.collate`; crops and flips happen later on whole batches, see :class:`mal.data.JointAugment`.

Besides the attributes of the classification datasets (``classes``, ``num_classes``, ``channels``, ``mean``,
``std``, ``load_size``, here an ``(H, W)`` tuple) every dense dataset has ``has_depth``, ``has_seg`` and
``max_depth`` (an upper bound of its depths, for plots and metrics). ``label_fraction``/``seed`` keep a seeded random
fraction of the samples (at least one). A file that cannot be decoded is warned about once
(:class:`mal.data.BadImageWarning`) and returned as ``(None, None)``, which the collate drops. Other keyword arguments
(e.g. ``max_bad_fraction``, which generic callers pass to every dataset) are accepted and ignored.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from mal.data.datasets import _DECODE_ERRORS, IMAGENET_MEAN, IMAGENET_STD, cover_crop, warn_bad_file

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


# --------------------------------------------------------------------------------------------------- NYU Depth v2

NYU_SPLITS = ("train", "test")
NYU_NUM_CLASSES = 894  # raw labels 1..894 of the labeled set; 0 is unlabeled
NYU_MAX_DEPTH = 10.0
_NYU_SPLIT_SEED = 0
_NYU_TRAIN_FRACTION = 795 / 1449  # the official split's proportion


def _nyu_names(f: h5py.File) -> tuple[str, ...] | None:
    """The class names of the MATLAB cell array ``names`` (references to uint16 char arrays), if readable."""
    if "names" not in f:
        return None
    try:
        return tuple("".join(map(chr, np.asarray(f[ref]).ravel())) for ref in np.asarray(f["names"]).ravel())
    except (KeyError, TypeError, ValueError, OSError):
        return None


def _load_class_map(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class map not found: {path}")
    values = np.asarray(json.loads(path.read_text()) if path.suffix.lower() == ".json" else np.load(path))
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer) or len(values) == 0:
        raise ValueError(f"class map {path} must be a 1-d list of integer class ids indexed by raw label")
    if (values < 0).any() or (values > IGNORE_INDEX).any():
        raise ValueError(f"class map {path} holds ids outside 0..{IGNORE_INDEX}")
    return values.astype(np.int64)


class NYUDepthV2Dataset(DenseDataset):
    """NYU Depth v2 labeled set: ``root`` is the path of ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5).

    The file stores MATLAB's axes reversed (``images`` ``(N, 3, 640, 480)`` uint8, ``depths`` ``(N, 640, 480)`` in
    metres, ``labels`` ``(N, 640, 480)`` uint16 with 0 = unlabeled); samples come back as ``(3, 480, 640)`` /
    ``(480, 640)`` resized to ``load_size`` (image bilinear antialiased, depth and mask nearest).

    Splits ``train`` and ``test`` (``val`` is an alias of ``test``): the official ``splits.mat`` (``trainNdxs``,
    ``testNdxs``, 1-based) when a file of that name lies next to ``root``, else a fixed seeded permutation with the
    official 795/1449 train proportion; ``split_source`` (and ``repr``) says which. Masks: raw label 0 -> 255 and
    ``k -> k - 1`` (894 classes), or ``class_map`` (a ``.json`` list or ``.npy`` array indexed by raw label giving the
    class id or 255; raw labels past its end are ignored); ``segmentation=False`` gives all-255 masks.

    The file is opened lazily, once per process, so DataLoader workers each get their own handle.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        load_size: int | tuple[int, int] | None = (240, 320),
        segmentation: bool = True,
        class_map: str | os.PathLike | None = None,
        label_fraction: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ):
        split = "test" if split == "val" else split
        if split not in NYU_SPLITS:
            raise ValueError(f"unknown NYU Depth v2 split {split!r}; valid splits: train, test (val = test)")
        path = Path(root)
        if not path.is_file():
            raise FileNotFoundError(f"NYU Depth v2 file not found: {path} (expected nyu_depth_v2_labeled.mat)")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise ValueError(f"{path} is not a MATLAB v7.3 (HDF5) file: {e}") from e
        with f:
            needed = ("images", "depths", "labels") if segmentation else ("images", "depths")
            missing = [k for k in needed if k not in f]
            if missing:
                raise ValueError(f"{path} has no {', '.join(missing)}; is it nyu_depth_v2_labeled.mat?")
            n, c, w, h = f["images"].shape
            if c != 3 or any(f[k].shape != (n, w, h) for k in needed[1:]):
                raise ValueError(f"unexpected shapes in {path}: " + ", ".join(f"{k} {f[k].shape}" for k in needed))
            names = _nyu_names(f) if segmentation and class_map is None else None

        splits_path = path.parent / "splits.mat"
        if splits_path.is_file():
            from scipy.io import loadmat

            mat = loadmat(splits_path)
            key = "trainNdxs" if split == "train" else "testNdxs"
            indices = np.asarray(mat[key]).ravel().astype(np.int64) - 1
            if len(indices) and (indices.min() < 0 or indices.max() >= n):
                raise ValueError(f"{splits_path}: {key} has indices outside 1..{n}")
            self.split_source = str(splits_path)
        else:
            perm = np.random.default_rng(_NYU_SPLIT_SEED).permutation(n)
            n_train = min(max(1, round(n * _NYU_TRAIN_FRACTION)), n - 1) if n > 1 else n
            indices = np.sort(perm[:n_train] if split == "train" else perm[n_train:])
            self.split_source = "seeded"

        lut = np.full(1 << 16, IGNORE_INDEX, dtype=np.int64)  # raw uint16 label -> class id
        if class_map is not None:
            values = _load_class_map(class_map)
            lut[: len(values)] = values[: len(lut)]
            kept = values[values != IGNORE_INDEX]
            num_classes = int(kept.max()) + 1 if len(kept) else 0
            classes = tuple(f"class_{k}" for k in range(num_classes))
        else:
            classes = names if names else tuple(f"class_{k}" for k in range(NYU_NUM_CLASSES))
            num_classes = len(classes)
            lut[1 : num_classes + 1] = np.arange(num_classes)

        self.root = str(path)
        self.split = split
        self.load_size = as_hw((240, 320) if load_size is None else load_size)
        self.label_fraction = float(label_fraction)
        self.indices = indices[random_subset(len(indices), label_fraction, seed)]
        self.classes = classes
        self.num_classes = num_classes
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.has_depth, self.has_seg = True, bool(segmentation)
        self.max_depth = NYU_MAX_DEPTH
        self._lut = torch.from_numpy(lut)
        self._h5: h5py.File | None = None
        self._h5_pid: int | None = None

    def _file(self) -> h5py.File:
        # a handle inherited through fork is not safe to share, so every process opens its own
        if self._h5 is None or self._h5_pid != os.getpid():
            self._h5 = h5py.File(self.root, "r")
            self._h5_pid = os.getpid()
        return self._h5

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"], state["_h5_pid"] = None, None
        return state

    def __getitem__(self, i: int) -> tuple[torch.Tensor, DenseTarget] | tuple[None, None]:
        """``(image uint8 (3, H, W), {"depth": float32 (H, W), "mask": int64 (H, W)})`` at ``load_size``."""
        k = int(self.indices[i])
        try:
            f = self._file()
            image = np.asarray(f["images"][k]).transpose(0, 2, 1)  # (3, W, H) -> (3, H, W)
            depth = np.asarray(f["depths"][k], dtype=np.float32).T
            labels = np.asarray(f["labels"][k]).T.astype(np.int64) if self.has_seg else None
        except OSError as e:
            return self._bad(f"{self.root}[{k}]", f"could not read sample {k} of {self.root}", e)
        image_t = torch.from_numpy(np.ascontiguousarray(image).clip(0, 255).astype(np.uint8))
        depth_t = torch.from_numpy(np.ascontiguousarray(depth))
        depth_t = torch.nan_to_num_(depth_t, nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0.0)
        if labels is None:
            mask_t = torch.full(depth_t.shape, IGNORE_INDEX, dtype=torch.int64)
        else:
            mask_t = self._lut[torch.from_numpy(labels.clip(0, len(self._lut) - 1))]
        image_t, depth_t, mask_t = resize_dense(image_t, depth_t, mask_t, self.load_size)
        return image_t, {"depth": depth_t, "mask": mask_t}

    def __repr__(self) -> str:
        return (
            f"NYUDepthV2Dataset(root={self.root!r}, split={self.split!r}, n={len(self)}, splits={self.split_source!r}, "
            f"load_size={self.load_size}, segmentation={self.has_seg}, classes={self.num_classes})"
        )


# ---------------------------------------------------------------------------------------------------------- ADE20K

ADE20K_SPLITS = {"train": "training", "val": "validation"}
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
_ADE20K_LUT = np.full(256, IGNORE_INDEX, dtype=np.int64)  # annotation value -> class id: 0 ("other") is ignored
_ADE20K_LUT[1 : len(ADE20K_CLASSES) + 1] = np.arange(len(ADE20K_CLASSES))


def load_image_and_mask(image_path: str, mask_path: str, size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """RGB uint8 ``(3, H, W)`` and the single-channel annotation ``(H, W)`` (raw values), both scaled so the image
    covers ``size = (H, W)`` (image bilinear, antialiased by PIL when shrinking; mask nearest) and centre-cropped.

    Raises PIL's decoding errors, or ValueError when the annotation is not single-channel or not the image's size.
    """
    with Image.open(image_path) as img:
        img.load()
        img = img.convert("RGB")
    with Image.open(mask_path) as ann:
        ann.load()
        if ann.mode not in ("L", "P"):
            raise ValueError(f"annotation mode {ann.mode!r}, expected single-channel 8-bit")
        ann = ann.copy()
    if ann.size != img.size:
        raise ValueError(f"annotation size {ann.size} differs from the image's {img.size}")
    new_size, box = cover_crop(img.size, size)
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.BILINEAR)
        ann = ann.resize(new_size, Image.Resampling.NEAREST)
    image = torch.from_numpy(np.asarray(img.crop(box), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    return image, np.asarray(ann.crop(box), dtype=np.uint8)


class ADE20KDataset(DenseDataset):
    """ADE20K scene parsing (SceneParsing 2016): ``root`` is the ``ADEChallengeData2016`` folder.

    Images ``images/{training,validation}/*.jpg`` with annotations ``annotations/<same>/<stem>.png`` (single-channel
    uint8: 0 = other -> 255, 1..150 -> 0..149). Splits ``train`` (training) and ``val`` (validation). Each sample's
    shorter side is resized to ``load_size`` and the centre square cropped (for an ``(H, W)`` load size: scaled to
    cover it and centre-cropped); no depth (zeros).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        load_size: int | tuple[int, int] | None = 256,
        label_fraction: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ):
        if split not in ADE20K_SPLITS:
            raise ValueError(f"unknown ADE20K split {split!r}; valid splits: {', '.join(ADE20K_SPLITS)}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"ADE20K folder not found: {root} (expected ADEChallengeData2016)")
        image_dir, ann_dir = root / "images" / ADE20K_SPLITS[split], root / "annotations" / ADE20K_SPLITS[split]
        for d in (image_dir, ann_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"ADE20K folder not found: {d}")
        images = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg"))
        if not images:
            raise ValueError(f"no .jpg images in {image_dir}")
        annotations = {p.stem: p for p in ann_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
        missing = [p for p in images if p.stem not in annotations]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(
                f"annotation not found: {ann_dir / (missing[0].stem + '.png')} for image {missing[0]}{more}"
            )
        samples = [(str(p), str(annotations[p.stem])) for p in images]

        self.root = str(root)
        self.split = split
        self.load_size = as_hw(256 if load_size is None else load_size)
        self.label_fraction = float(label_fraction)
        self.indices = random_subset(len(samples), label_fraction, seed)
        self.samples = [samples[i] for i in self.indices]
        self.classes = ADE20K_CLASSES
        self.num_classes = len(ADE20K_CLASSES)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.has_depth, self.has_seg = False, True
        self.max_depth = 0.0
        self._warned: set[str] = set()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, DenseTarget] | tuple[None, None]:
        """``(image uint8 (3, H, W), {"depth": zeros float32 (H, W), "mask": int64 (H, W)})``, or ``(None, None)``
        when a file cannot be decoded."""
        image_path, mask_path = self.samples[i]
        try:
            image, raw = load_image_and_mask(image_path, mask_path, self.load_size)
        except _DECODE_ERRORS as e:
            return self._bad(image_path, f"could not read image {image_path} or annotation {mask_path}", e)
        target = self._blank_target()
        target["mask"] = torch.from_numpy(_ADE20K_LUT[raw])
        return image, target

    def __repr__(self) -> str:
        return f"ADE20KDataset(root={self.root!r}, split={self.split!r}, n={len(self)}, load_size={self.load_size})"


# ------------------------------------------------------------------------------------------------ procedural scenes

SCENE_CLASSES = ("background", "disc", "square", "triangle", "ring")
SCENE_SPLITS = {"train": 2000, "val": 200, "test": 500}  # default number of samples
SCENE_MAX_DEPTH = 10.0
# measured on the 2000 train scenes of seed 0 at 32 px (_scene_stats)
SCENE_MEAN = (0.5981, 0.5985, 0.6140)
SCENE_STD = (0.1365, 0.1347, 0.1375)
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}
_FOG = np.array([0.72, 0.72, 0.76])  # colour of the far haze; brightness and contrast fade towards it with depth
_FOG_DEPTH = 8.0  # metres over which the haze weight grows by a factor e


@dataclass
class Scene:
    """One rendered scene: the sample's arrays and the layers it was drawn from.

    ``image`` uint8 ``(3, H, W)``, ``depth`` float32 ``(H, W)``, ``mask`` int64 ``(H, W)``, ``background_depth``
    float32 ``(H, W)``; ``shapes`` lists ``(class_id, depth, footprint)`` far to near, ``footprint`` the bool
    ``(H, W)`` pixels of that shape before occlusion by nearer ones.
    """

    image: np.ndarray
    depth: np.ndarray
    mask: np.ndarray
    background_depth: np.ndarray
    shapes: list[tuple[int, float, np.ndarray]]


def render_scene(rng: np.random.Generator, size: tuple[int, int]) -> Scene:
    """Draw one scene of ``size = (H, W)``: a floor meeting a back wall, then 1-4 shapes standing on (or floating
    above) the floor, painted far to near.

    A pinhole camera (focal length = image height) at a random height looks at a horizon row; the floor's depth is
    ``height / (row - horizon)``, capped by the wall. A shape at depth ``z`` has an apparent radius proportional to
    ``1 / z`` and its lowest point on (or just above) the floor row of depth ``z``, so shapes are always nearer than
    the background behind them. Colours are random per shape (not per class) with a random stripe texture; a depth
    haze fades every pixel towards a grey, and pixel noise is added.
    """
    h, w = size
    ys = (np.arange(h) + 0.5) / h  # row position, 0 = top, 1 = bottom, in units of the image height
    xs = (np.arange(w) + 0.5) / h
    X, Y = np.meshgrid(xs, ys)  # (H, W)

    horizon = rng.uniform(0.25, 0.45)
    cam_height = rng.uniform(1.0, 1.6)
    wall = rng.uniform(7.5, 9.5)
    below = np.maximum(Y - horizon, 1e-6)
    bg_depth = np.where(horizon < Y, np.minimum(wall, cam_height / below), wall)
    on_floor = bg_depth < wall

    # floor: a perspective checkerboard (world coordinates on the ground plane); wall: a vertical gradient
    floor_colour, wall_colour = rng.uniform(0.2, 0.9, (2, 3, 1, 1))
    tile = rng.uniform(0.4, 0.9)
    ground_x = (X - xs.mean()) * bg_depth
    checker = (np.floor(ground_x / tile) + np.floor(bg_depth / tile)) % 2
    floor = floor_colour * (1.0 + rng.uniform(0.1, 0.3) * (checker - 0.5))
    wall_img = wall_colour * (1.0 + rng.uniform(-0.2, 0.2) * (Y - 0.5))
    colour = np.where(on_floor, floor, wall_img)  # (3, H, W)
    depth = bg_depth.copy()
    mask = np.zeros((h, w), dtype=np.int64)

    n = int(rng.integers(1, 5))
    z = np.sort(rng.uniform(1.5, 7.0, n))[::-1]  # far to near: nearer shapes are painted over farther ones
    shapes = []
    for zi in z:
        cls = int(rng.integers(1, len(SCENE_CLASSES)))
        r = rng.uniform(0.4, 0.7) / zi  # apparent radius in image heights
        theta = rng.uniform(0.0, 2 * np.pi)
        half = r * np.sqrt(np.pi) / 2  # square of the disc's area
        circ = r * 1.55  # triangle of about the disc's area (circumradius)
        ring_out, ring_in = r * 1.15, r * 0.6  # ring of about the disc's area
        # how far the rotated shape reaches below its centre
        extent = {
            1: r,
            2: half * (abs(np.cos(theta)) + abs(np.sin(theta))),
            3: circ * np.sin(theta + 2 * np.pi * np.arange(3) / 3).max(),
            4: ring_out,
        }[cls]
        cx = rng.uniform(0.0, w / h)
        # lowest point just above the floor row of depth zi (standing on the floor) or up to 0.15 higher (floating)
        cy = horizon + cam_height / zi - extent - rng.uniform(0.005, 0.15)
        dx, dy = X - cx, Y - cy
        u, v = dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)
        dist2 = dx * dx + dy * dy
        if cls == 1:  # disc
            inside = dist2 <= r * r
        elif cls == 2:  # square
            inside = (np.abs(u) <= half) & (np.abs(v) <= half)
        elif cls == 3:  # equilateral triangle: inside its three edges, each at circumradius / 2 from the centre
            inside = np.ones((h, w), dtype=bool)
            for a in theta + np.pi / 3 + 2 * np.pi * np.arange(3) / 3:
                inside &= dx * np.cos(a) + dy * np.sin(a) <= circ / 2
        else:  # ring
            inside = (dist2 <= ring_out**2) & (dist2 >= ring_in**2)

        base = rng.uniform(0.05, 0.95, (3, 1, 1))
        phase, period = rng.uniform(0, 2 * np.pi), r * rng.uniform(0.4, 1.2)
        stripes = np.sin(2 * np.pi * u / period + phase)
        shaded = base * (1.0 + rng.uniform(0.0, 0.35) * stripes - rng.uniform(0.0, 0.3) * (v / r).clip(-1, 1))
        colour[:, inside] = shaded[:, inside]
        depth[inside] = zi
        mask[inside] = cls
        shapes.append((cls, float(zi), inside))

    haze = 1.0 - np.exp(-depth / _FOG_DEPTH)
    fog = _FOG[:, None, None] * rng.uniform(0.85, 1.0)
    pixels = colour * (1.0 - haze) + fog * haze + rng.normal(0.0, 0.02, colour.shape)
    image = (pixels.clip(0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Scene(image, depth.astype(np.float32), mask, bg_depth.astype(np.float32), shapes)


def _render(seed: int, stream: int, k: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s = render_scene(np.random.default_rng([seed, stream, k]), size)
    return torch.from_numpy(s.image), torch.from_numpy(s.depth), torch.from_numpy(s.mask)


# shared by every dataset object in the process (runs of a demo rebuild their datasets); ~15 KB per 32 px sample
_rendered = functools.lru_cache(maxsize=8192)(_render)


class ProceduralScenesDataset(DenseDataset):
    """Procedurally generated scenes with depth and segmentation labels (see :func:`render_scene`).

    Classes: ``background`` (floor and wall) and four shapes, ``disc``, ``square``, ``triangle``, ``ring``. Sample
    ``i`` is determined by ``(scene_seed, split, i)``: splits ``train``/``val``/``test`` (2000/200/500 samples
    unless ``num_samples``) draw from different random streams. Samples are rendered on first access and cached
    (``cache=False`` renders every time). ``label_fraction`` keeps a random fraction chosen by ``seed`` (as for the
    other datasets, so every run seed's subset comes from the same scenes); ``indices`` are the kept sample
    numbers. ``mean``/``std`` are fixed numbers measured on the scene-seed-0 train split at 32 px.
    """

    def __init__(
        self,
        split: str,
        load_size: int | tuple[int, int] | None = 32,
        num_samples: int | None = None,
        scene_seed: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
        cache: bool = True,
        **kwargs: Any,
    ):
        if split not in SCENE_SPLITS:
            raise ValueError(f"unknown scenes split {split!r}; valid splits: {', '.join(SCENE_SPLITS)}")
        n = SCENE_SPLITS[split] if num_samples is None else int(num_samples)
        if n < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.split = split
        self.scene_seed = int(scene_seed)
        self.num_samples = n
        self.load_size = as_hw(32 if load_size is None else load_size)
        self.label_fraction = float(label_fraction)
        self.indices = random_subset(n, label_fraction, seed)
        self.classes = SCENE_CLASSES
        self.num_classes = len(SCENE_CLASSES)
        self.mean, self.std = SCENE_MEAN, SCENE_STD
        self.has_depth, self.has_seg = True, True
        self.max_depth = SCENE_MAX_DEPTH
        self.cache = bool(cache)

    def scene(self, i: int) -> Scene:
        """The full :class:`Scene` of sample ``i`` (with its layers, for tests and plots)."""
        k = int(self.indices[i])
        return render_scene(np.random.default_rng([self.scene_seed, _SPLIT_STREAM[self.split], k]), self.load_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, DenseTarget]:
        """``(image uint8 (3, H, W), {"depth": float32 (H, W), "mask": int64 (H, W)})``."""
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        key = (self.scene_seed, _SPLIT_STREAM[self.split], int(self.indices[i]), self.load_size)
        image, depth, mask = _rendered(*key) if self.cache else _render(*key)
        # copies, so a caller writing into a sample does not change the cache
        return image.clone(), {"depth": depth.clone(), "mask": mask.clone()}

    def __repr__(self) -> str:
        return (
            f"ProceduralScenesDataset(split={self.split!r}, n={len(self)}, scene_seed={self.scene_seed}, "
            f"load_size={self.load_size})"
        )


def _scene_stats(num_samples: int = 2000, load_size: int = 32, seed: int = 0) -> tuple[tuple[float, ...], ...]:
    """``(mean, std)`` per channel in [0, 1] of the train scenes (how ``SCENE_MEAN``/``SCENE_STD`` were measured)."""
    ds = ProceduralScenesDataset("train", load_size, num_samples=num_samples, scene_seed=seed, cache=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).double() / 255.0  # (N, 3, H, W)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False)
    return tuple(mean.tolist()), tuple(std.tolist())


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
