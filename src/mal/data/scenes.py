"""Procedural scenes: shapes of 5 classes at known depths with occlusion and haze, rendered from a seed (no files)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mal.data.common import (
    DenseDataset,
    DenseTarget,
    as_hw,
    random_subset,
)

SCENE_CLASSES = ("background", "disc", "square", "triangle", "ring")
SCENE_SPLITS = {"train": 2000, "val": 200, "test": 500}  # default number of samples
SCENE_TARGETS = ("dense", "class", "count")
SCENE_VISIBLE = 0.01  # share of the image a shape must show to be counted (target="count")
SCENE_MAX_DEPTH = 10.0
# measured on the 2000 train scenes of seed 0 at 32 px (_scene_stats)
SCENE_MEAN = (0.5981, 0.5985, 0.6140)
SCENE_STD = (0.1365, 0.1347, 0.1375)
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}
_FOG = np.array([0.72, 0.72, 0.76])  # colour of the far haze; brightness and contrast fade towards it with depth
_FOG_DEPTH = 8.0  # metres over which the haze weight grows by a factor e


def scene_count(split: str, num_samples: int | None, what: str = "scenes") -> int:
    """The number of samples of a split of the procedural scenes (:data:`SCENE_SPLITS` unless ``num_samples``),
    checked; ``what`` names the dataset in the error."""
    if split not in SCENE_SPLITS:
        raise ValueError(f"unknown {what} split {split!r}; valid splits: {', '.join(SCENE_SPLITS)}")
    n = SCENE_SPLITS[split] if num_samples is None else int(num_samples)
    if n < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    return n


def scene_key(dataset: Any, i: int) -> tuple[int, int, int, Any]:
    """The render key ``(scene_seed, split stream, scene number, load_size)`` of sample ``i`` (negative from the end)
    of a procedural dataset (scenes, instances): what its renderer and cache take."""
    n = len(dataset)
    i = int(i) + (n if int(i) < 0 else 0)
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for {n} samples")
    return dataset.scene_seed, _SPLIT_STREAM[dataset.split], int(dataset.indices[i]), dataset.load_size


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


def _render(
    seed: int, stream: int, k: int, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    s = render_scene(np.random.default_rng([seed, stream, k]), size)
    return torch.from_numpy(s.image), torch.from_numpy(s.depth), torch.from_numpy(s.mask), visible_shapes(s)


def visible_shapes(scene: Scene, share: float = SCENE_VISIBLE) -> int:
    """How many shapes of ``scene`` show at least ``share`` of the image's pixels after occlusion by nearer ones."""
    nearer = np.zeros(scene.mask.shape, dtype=bool)
    count = 0
    for _, _, footprint in reversed(scene.shapes):  # near to far
        count += int((footprint & ~nearer).sum() >= share * footprint.size)
        nearer |= footprint
    return count


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

    ``target="class"`` makes it a classification dataset of the same images: the label of a scene is the class of
    its largest visible shape (the most pixels of the segmentation mask; ties go to the lower class id), one of the
    four shapes (``classes`` then lists them, labels 0-3). Every scene shows at least one shape and the four classes
    are near-balanced; the image-level label lets a classification fine-tune use exactly the scenes whose dense
    labels a multi-task pretraining saw. ``target="count"``: the label is the number of shapes that show at least
    1% of the image (:func:`visible_shapes`), 1-4 as labels 0-3 (a scene with none counts as 1).
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
        target: str = "dense",
        **kwargs: Any,
    ):
        n = scene_count(split, num_samples)
        if target not in SCENE_TARGETS:
            raise ValueError(f"unknown scenes target {target!r}; valid: {', '.join(SCENE_TARGETS)}")
        self.target = target
        self.split = split
        self.scene_seed = int(scene_seed)
        self.num_samples = n
        self.load_size = as_hw(32 if load_size is None else load_size)
        self.label_fraction = float(label_fraction)
        self.indices = random_subset(n, label_fraction, seed)
        dense = target == "dense"
        self.classes = {"dense": SCENE_CLASSES, "class": SCENE_CLASSES[1:], "count": ("1", "2", "3", "4")}[target]
        self.num_classes = len(self.classes)
        self.mean, self.std = SCENE_MEAN, SCENE_STD
        self.has_depth, self.has_seg = dense, dense
        self.max_depth = SCENE_MAX_DEPTH
        self.cache = bool(cache)

    def scene(self, i: int) -> Scene:
        """The full :class:`Scene` of sample ``i`` (with its layers, for tests and plots)."""
        k = int(self.indices[i])
        return render_scene(np.random.default_rng([self.scene_seed, _SPLIT_STREAM[self.split], k]), self.load_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, DenseTarget | int]:
        """``(image uint8 (3, H, W), {"depth": float32 (H, W), "mask": int64 (H, W)})``, or ``(image, label)`` with
        ``target="class"`` or ``"count"``."""
        key = scene_key(self, i)
        image, depth, mask, count = _rendered(*key) if self.cache else _render(*key)
        if self.target == "class":
            return image.clone(), largest_shape(mask)
        if self.target == "count":
            return image.clone(), max(count, 1) - 1
        # copies, so a caller writing into a sample does not change the cache
        return image.clone(), {"depth": depth.clone(), "mask": mask.clone()}

    def __repr__(self) -> str:
        return (
            f"ProceduralScenesDataset(split={self.split!r}, n={len(self)}, scene_seed={self.scene_seed}, "
            f"load_size={self.load_size}, target={self.target!r})"
        )


def largest_shape(mask: torch.Tensor) -> int:
    """The image-level label of a scene: the class of the shape with the most visible pixels in ``mask`` (int64
    ``(H, W)`` of :data:`SCENE_CLASSES` ids), as an index into the four shape classes (``disc`` = 0); ties go to
    the lower id."""
    counts = torch.bincount(mask.flatten(), minlength=len(SCENE_CLASSES))[1:]
    return int(counts.argmax())


def _scene_stats(num_samples: int = 2000, load_size: int = 32, seed: int = 0) -> tuple[tuple[float, ...], ...]:
    """``(mean, std)`` per channel in [0, 1] of the train scenes (how ``SCENE_MEAN``/``SCENE_STD`` were measured)."""
    ds = ProceduralScenesDataset("train", load_size, num_samples=num_samples, scene_seed=seed, cache=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))]).double() / 255.0  # (N, 3, H, W)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False)
    return tuple(mean.tolist()), tuple(std.tolist())
