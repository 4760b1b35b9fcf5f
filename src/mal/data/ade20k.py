"""ADE20K (``ADEChallengeData2016``): scene parsing with 150 classes; label 0 (other) is ignored."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mal.data.common import (
    _DECODE_ERRORS,
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DenseDataset,
    DenseTarget,
    UnsupportedImageError,
    as_hw,
    cover_crop,
    decode_image,
    image_size,
    image_tensor,
    random_subset,
    resize_image,
)

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


def load_image_and_mask(
    image_path: str, mask_path: str, size: tuple[int, int], *, warned: set[str] | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """The image ``(3, H, W)`` (:func:`~mal.data.common.read_image`: uint8, or float32 for files of more than 8 bits)
    and the single-channel annotation ``(H, W)`` (raw values), both scaled so the image covers ``size = (H, W)``
    (image bilinear, antialiased by PIL when shrinking; mask nearest) and centre-cropped.

    Raises PIL's decoding errors, :class:`~mal.data.common.UnsupportedImageError`, or ValueError when the annotation
    is not single-channel or not the image's size.
    """
    image = decode_image(image_path, 3, warned=warned)
    with Image.open(mask_path) as ann:
        ann.load()
        if ann.mode not in ("L", "P"):
            raise ValueError(f"annotation mode {ann.mode!r}, expected single-channel 8-bit")
        ann = ann.copy()
    if ann.size != image_size(image):
        raise ValueError(f"annotation size {ann.size} differs from the image's {image_size(image)}")
    new_size, box = cover_crop(ann.size, size)
    if new_size != ann.size:
        image = resize_image(image, new_size, Image.Resampling.BILINEAR)
        ann = ann.resize(new_size, Image.Resampling.NEAREST)
    left, top, right, bottom = box
    x = image_tensor(image)[:, top:bottom, left:right].contiguous()
    return x, np.asarray(ann.crop(box), dtype=np.uint8)


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
            image, raw = load_image_and_mask(image_path, mask_path, self.load_size, warned=self._warned)
        except UnsupportedImageError:
            raise  # a format to convert, not a bad file
        except _DECODE_ERRORS as e:
            return self._bad(image_path, f"could not read image {image_path} or annotation {mask_path}", e)
        target = self._blank_target()
        target["mask"] = torch.from_numpy(_ADE20K_LUT[raw])
        return image, target

    def __repr__(self) -> str:
        return f"ADE20KDataset(root={self.root!r}, split={self.split!r}, n={len(self)}, load_size={self.load_size})"
