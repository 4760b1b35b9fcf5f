"""Procedural instances: the scenes of :mod:`mal.data.scenes` as detection and instance-segmentation samples, one
instance per visible shape (no files; :func:`mal.data.write_coco` writes them as COCO files)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from mal.data.coco import (
    DetectionDataset,
    DetectionTarget,
    check_load_size,
    coco_categories,
    coco_from_dict,
    target_annotations,
)
from mal.data.common import random_subset
from mal.data.scenes import (
    _SPLIT_STREAM,
    SCENE_CLASSES,
    SCENE_MEAN,
    SCENE_STD,
    Scene,
    render_scene,
    scene_count,
    scene_key,
)

INSTANCE_CLASSES = SCENE_CLASSES[1:]  # disc, square, triangle, ring: labels 1..4; the scenes' background is 0
#: The fewest visible pixels that make a shape an instance: less is a sliver behind a nearer shape or at the border,
#: which no detector can be asked to find.
MIN_VISIBLE_PIXELS = 4
INSTANCES_LOAD_SIZE = 64  # the default side: the farthest shapes are then about 7 pixels wide


def scene_instances(scene: Scene, min_pixels: int = MIN_VISIBLE_PIXELS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The instances of a scene, far to near: ``(boxes float32 (N, 4), labels int64 (N,), masks uint8 (N, H, W))``.

    A shape's mask is its visible part, its footprint less the nearer shapes' footprints, kept when it has at least
    ``min_pixels`` pixels; its box is that part's tight box in pixel edges (``x1`` = first column, ``x2`` = last
    column + 1); its label is its class (1..4).
    """
    h, w = scene.mask.shape
    nearer = np.zeros((h, w), dtype=bool)
    found = []
    for cls, _, footprint in reversed(scene.shapes):  # near to far: each shape is hidden by those already seen
        visible = footprint & ~nearer
        nearer |= footprint
        if visible.sum() >= min_pixels:
            rows, cols = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
            found.append(([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], cls, visible))
    found.reverse()
    boxes = np.array([f[0] for f in found], dtype=np.float32).reshape(-1, 4)
    labels = np.array([f[1] for f in found], dtype=np.int64)
    masks = np.stack([f[2] for f in found]).astype(np.uint8) if found else np.zeros((0, h, w), np.uint8)
    return boxes, labels, masks


def _render(seed: int, stream: int, k: int, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # the scenes dataset's random stream: sample k is the same picture in both
    scene = render_scene(np.random.default_rng([seed, stream, k]), (side, side))
    boxes, labels, masks = scene_instances(scene)
    return torch.from_numpy(scene.image), torch.from_numpy(boxes), torch.from_numpy(labels), torch.from_numpy(masks)


# shared by every dataset object in the process; ~30 KB per 64 px sample
_rendered = functools.lru_cache(maxsize=4096)(_render)


class ProceduralInstancesDataset(DetectionDataset):
    """The procedural scenes (:func:`~mal.data.scenes.render_scene`) as instance segmentation: one instance per shape
    with at least :data:`MIN_VISIBLE_PIXELS` visible pixels (:func:`scene_instances`), classes ``disc``,
    ``square``, ``triangle``, ``ring`` (labels 1..4).

    Sample ``i`` is the scenes dataset's sample of the same ``(scene_seed, split, number)`` rendered at ``load_size``
    (square, default 64): splits ``train``/``val``/``test`` (2000/200/500 unless ``num_samples``). A scene without
    an instance (rare: the nearest shape is nearly always in view; none among the 2000 training scenes of seed 0 at
    64 px) gives an empty target (boxes ``(0, 4)``) in every split, so that sample numbers stay the scenes';
    torchvision's detectors take empty targets. ``label_fraction``/``seed`` keep a random fraction;
    ``image_ids`` are the kept sample numbers + 1. ``coco`` (the kept samples' ground truth, masks as RLE) is built
    in memory on first use. ``mean``/``std`` are the scenes'.
    """

    def __init__(
        self,
        split: str,
        load_size: int | None = INSTANCES_LOAD_SIZE,
        num_samples: int | None = None,
        scene_seed: int = 0,
        label_fraction: float = 1.0,
        seed: int = 0,
        cache: bool = True,
        **kwargs: Any,
    ):
        n = scene_count(split, num_samples, "instances")
        side = check_load_size(INSTANCES_LOAD_SIZE if load_size is None else load_size)
        self.split = split
        self.scene_seed = int(scene_seed)
        self.num_samples = n
        self.load_size = side
        self.label_fraction = float(label_fraction)
        self.indices = random_subset(n, label_fraction, seed)
        self.image_ids = [int(k) + 1 for k in self.indices]
        self.orig_sizes = [(side, side)] * len(self.indices)
        self.classes = INSTANCE_CLASSES
        self.num_classes = len(INSTANCE_CLASSES)
        self.cat_ids = list(range(1, len(INSTANCE_CLASSES) + 1))
        self.mean, self.std = SCENE_MEAN, SCENE_STD
        self.has_masks = True
        self.cache = bool(cache)

    def scene(self, i: int) -> Scene:
        """The full :class:`~mal.data.scenes.Scene` of sample ``i`` (its layers, for tests and plots)."""
        k = int(self.indices[i])
        rng = np.random.default_rng([self.scene_seed, _SPLIT_STREAM[self.split], k])
        return render_scene(rng, (self.load_size, self.load_size))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, DetectionTarget]:
        """``(image uint8 (3, S, S), {"boxes": float32 (N, 4), "labels": int64 (N,), "masks": uint8 (N, S, S),
        "image_id": int})``."""
        key = scene_key(self, i)
        image, boxes, labels, masks = _rendered(*key) if self.cache else _render(*key)
        # copies, so a caller writing into a sample does not change the cache
        target = {
            "boxes": boxes.clone(),
            "labels": labels.clone(),
            "masks": masks.clone(),
            "image_id": self.image_ids[i],
        }
        return image.clone(), target

    @functools.cached_property
    def coco(self) -> Any:
        """The ground truth of the kept samples as a ``pycocotools.coco.COCO`` (masks as compressed RLE)."""
        side = self.load_size
        images, annotations = [], []
        for i in range(len(self)):
            _, target = self[i]
            images.append({"id": target["image_id"], "file_name": f"{target['image_id']:012d}.png", "height": side,
                           "width": side})  # fmt: skip
            annotations += target_annotations(target, self.cat_ids, len(annotations) + 1)
        return coco_from_dict({"images": images, "annotations": annotations, "categories": coco_categories(self)})

    def __repr__(self) -> str:
        return (
            f"ProceduralInstancesDataset(split={self.split!r}, n={len(self)}, scene_seed={self.scene_seed}, "
            f"load_size={self.load_size})"
        )
