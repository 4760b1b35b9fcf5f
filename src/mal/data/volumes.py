"""Procedural CT-like volumes: an abdomen-like body with four labelled organs, rendered from a seed (no files), as 2-D
slices in the layout of the Synapse data (:mod:`mal.data.synapse`): the data of the medical demo."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from mal.data.common import DenseTarget, SliceDataset, Volume, as_hw, random_subset

VOLUME_CLASSES = ("background", "liver", "kidney", "spleen", "aorta")
VOLUME_SPLITS = {"train": 24, "val": 4, "test": 8}  # default number of volumes
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}
HU_WINDOW = (-125.0, 275.0)  # Synapse's (TransUNet's) window: HU clipped to it and scaled to [0, 1]
FIELD_OF_VIEW = 320.0  # mm across the slice, whatever its size in pixels
VOLUME_LENGTH = 80.0  # mm along z, whatever the number of slices
# measured on the 24 train volumes of seed 0 at 16 x 64 x 64 (_volume_stats)
VOLUME_MEAN = (0.1525,)
VOLUME_STD = (0.2173,)


def _blob(
    rng: np.random.Generator, X: np.ndarray, Y: np.ndarray, Z: np.ndarray, centre: tuple[float, float, float],
    radii: tuple[float, float, float],
) -> np.ndarray:  # fmt: skip
    """The voxels ``(D, H, W)`` of a smooth random blob: an ellipsoid rotated in-plane whose radius varies with the
    in-plane angle (harmonics 2 and 3) and slowly along z, so every slice cuts the same organ."""
    cx, cy, cz = centre
    rx, ry, rz = radii
    theta = rng.uniform(-0.4, 0.4)
    dx, dy = X - cx, Y - cy
    u, v = dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)
    angle = np.arctan2(v, u)
    wobble = 1.0
    for k in (2, 3):
        wobble = wobble + rng.uniform(0.0, 0.1) * np.sin(k * angle + rng.uniform(0, 2 * np.pi) + rng.uniform(-2, 2) * Z)
    r2 = (u / rx) ** 2 + (v / ry) ** 2 + ((Z - cz) / rz) ** 2
    return r2 <= wobble**2


def _texture(rng: np.random.Generator, X: np.ndarray, Y: np.ndarray, Z: np.ndarray, amplitude: float) -> np.ndarray:
    """A smooth random field ``(D, H, W)`` of about ``amplitude`` HU: three random 3-D plane waves."""
    field = np.zeros(np.broadcast_shapes(X.shape, Y.shape, Z.shape))
    for _ in range(3):
        k = rng.normal(0.0, 6.0, 3)
        field += np.sin(k[0] * X + k[1] * Y + k[2] * Z + rng.uniform(0, 2 * np.pi))
    return amplitude * field / np.sqrt(1.5)


def render_volume(rng: np.random.Generator, slices: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Draw one volume of ``slices`` x ``size = (H, W)`` voxels: ``(image float32 (D, H, W) in [0, 1], mask int64
    (D, H, W))`` with classes :data:`VOLUME_CLASSES`.

    In HU, then windowed like Synapse (:data:`HU_WINDOW` to [0, 1]), in radiological orientation (the patient's right
    on the image's left, the back at the bottom): air around an elliptic body whose outer rim is subcutaneous fat,
    soft tissue inside, a vertebra (bone, unlabelled) at the back; the organs are smooth blobs of their own mean
    intensity and texture, varying per volume: the liver (large, right), the spleen (medium, left, back), two kidneys
    (small, beside the spine, bright cortex around a dark pelvis) and the aorta (a small bright tube in front of the
    spine, every slice). CT-like noise (white plus in-plane correlated) comes last.
    """
    h, w = size
    # millimetre-like normalized coordinates: x, y in [-1, 1] across the field of view, z in [0, 1] along the volume
    Z = ((np.arange(slices) + 0.5) / slices)[:, None, None]
    Y = ((np.arange(h) + 0.5) / h * 2 - 1)[None, :, None]
    X = ((np.arange(w) + 0.5) / w * 2 - 1)[None, None, :]

    hu = np.full((slices, h, w), -1000.0)
    mask = np.zeros((slices, h, w), dtype=np.int64)
    ax, ay = rng.uniform(0.78, 0.92), rng.uniform(0.58, 0.7)
    breathe = 1 + 0.04 * np.sin(2 * np.pi * Z + rng.uniform(0, 2 * np.pi))
    r_body = (X / (ax * breathe)) ** 2 + ((Y - 0.05) / (ay * breathe)) ** 2
    fat = rng.uniform(0.82, 0.9)
    body = np.broadcast_to(r_body <= 1.0, hu.shape)
    hu[body] = -100.0 + rng.normal(0.0, 5.0)
    inner = np.broadcast_to(r_body <= fat**2, hu.shape)
    hu[inner] = (rng.uniform(30, 50) + _texture(rng, X, Y, Z, 6.0) + np.zeros_like(hu))[inner]

    spine_y = 0.05 + 0.62 * ay
    organs = [  # class, centre (x, y, z), radii (x, y, z), mean HU, texture HU
        (1, (-0.38 + rng.uniform(-0.05, 0.05), -0.12, rng.uniform(0.35, 0.5)),
         (rng.uniform(0.32, 0.4), rng.uniform(0.28, 0.36), rng.uniform(0.45, 0.6)), rng.uniform(55, 75), 8.0),
        (3, (0.48 + rng.uniform(-0.04, 0.04), 0.2, rng.uniform(0.35, 0.55)),
         (rng.uniform(0.11, 0.16), rng.uniform(0.15, 0.2), rng.uniform(0.22, 0.3)), rng.uniform(95, 120), 6.0),
    ]  # fmt: skip
    for side in (-1, 1):  # the two kidneys: one class
        organs.append((2, (side * rng.uniform(0.27, 0.33), spine_y - 0.08, rng.uniform(0.55, 0.7)),
                       (rng.uniform(0.08, 0.1), rng.uniform(0.11, 0.14), rng.uniform(0.17, 0.24)),
                       rng.uniform(150, 190), 5.0))  # fmt: skip
    for cls, centre, radii, mean, tex in organs:
        inside = _blob(rng, X, Y, Z, centre, radii)
        value = mean + _texture(rng, X, Y, Z, tex) + np.zeros_like(hu)
        if cls == 2:  # the renal pelvis: a dark core
            core = _blob(rng, X, Y, Z, centre, tuple(0.45 * r for r in radii))
            value = np.where(core, rng.uniform(10, 30), value)
        hu[inside], mask[inside] = value[inside], cls
    # the aorta: a tube along z in front of the spine, drifting a little
    a_x = 0.07 + rng.uniform(-0.02, 0.02) + 0.03 * (Z - 0.5)
    a_y = spine_y - 0.24 + rng.uniform(-0.02, 0.02)
    tube = np.broadcast_to((X - a_x) ** 2 + (Y - a_y) ** 2 <= rng.uniform(0.05, 0.065) ** 2, hu.shape)
    hu[tube], mask[tube] = rng.uniform(170, 230), 4
    bone = np.broadcast_to(X**2 + ((Y - spine_y) / 1.1) ** 2 <= 0.1**2, hu.shape)
    hu[bone], mask[bone] = rng.uniform(400, 700), 0

    noise = rng.normal(0.0, 30.0, hu.shape)
    noise = sum(np.roll(noise, (dy, dx), axis=(1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9  # ~10 HU
    hu = hu + noise + rng.normal(0.0, 6.0, hu.shape)
    lo, hi = HU_WINDOW
    image = ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    return image, mask


@functools.lru_cache(maxsize=256)  # shared by every dataset object in the process; 16 x 64 x 64: ~0.8 MB a volume
def _rendered(seed: int, stream: int, v: int, slices: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = render_volume(np.random.default_rng([seed, stream, v]), slices, size)
    return torch.from_numpy(image), torch.from_numpy(mask)


class ProceduralVolumesDataset(SliceDataset):
    """Procedural CT-like volumes (:func:`render_volume`) served as 2-D slices, like :class:`~mal.data.SynapseDataset`.

    Classes: :data:`VOLUME_CLASSES`. Volume ``v`` of a split is determined by ``(volume_seed, split, v)``: splits
    ``train`` / ``val`` / ``test`` (24 / 4 / 8 volumes unless ``num_volumes``) of ``num_slices`` slices each, every
    slice rendered at ``load_size`` (default 64). Every split has ``volumes`` (and volume tags in its targets);
    ``label_fraction < 1`` keeps a seeded random fraction of the slices (then no ``volumes``). Voxel spacing: a
    320 mm field of view across the slice and 80 mm along the volume, so HD95 is in mm at any size. Images are float32
    in [0, 1], one channel (``channels=3`` replicates it); ``mean``/``std`` are measured on the seed-0 train split at
    16 x 64 x 64.
    """

    def __init__(
        self,
        split: str,
        load_size: int | tuple[int, int] | None = 64,
        num_volumes: int | None = None,
        num_slices: int = 16,
        volume_seed: int = 0,
        channels: int = 1,
        label_fraction: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ):
        if split not in VOLUME_SPLITS:
            raise ValueError(f"unknown volumes split {split!r}; valid splits: {', '.join(VOLUME_SPLITS)}")
        n = VOLUME_SPLITS[split] if num_volumes is None else int(num_volumes)
        if n < 1 or num_slices < 1:
            raise ValueError(f"num_volumes and num_slices must be positive, got {num_volumes} and {num_slices}")
        self.split, self.volume_seed = split, int(volume_seed)
        self.num_volumes, self.num_slices = n, int(num_slices)
        self.load_size = as_hw(64 if load_size is None else load_size)
        self.channels = self._check_channels(channels)
        self.classes, self.num_classes = VOLUME_CLASSES, len(VOLUME_CLASSES)
        self.mean, self.std = VOLUME_MEAN * self.channels, VOLUME_STD * self.channels
        self.label_fraction = float(label_fraction)
        self.indices = random_subset(n * self.num_slices, label_fraction, seed)
        h, w = self.load_size
        spacing = (VOLUME_LENGTH / self.num_slices, FIELD_OF_VIEW / h, FIELD_OF_VIEW / w)
        d = self.num_slices
        volumes = [Volume(f"{split}{v:03d}", v * d, (v + 1) * d, spacing) for v in range(n)]
        self._set_volumes(volumes if self.label_fraction == 1.0 else [])

    def volume(self, v: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Volume ``v`` of the split: ``(image float32 (D, H, W), mask int64 (D, H, W))`` (cached; do not write)."""
        return _rendered(self.volume_seed, _SPLIT_STREAM[self.split], int(v), self.num_slices, self.load_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, DenseTarget]:
        """``(image float32 (C, H, W), {"depth": zeros float32 (H, W), "mask": int64 (H, W)}`` + volume tags)."""
        k = int(self.indices[i])
        image, mask = self.volume(k // self.num_slices)
        s = k % self.num_slices
        return self._slice_sample(i, image[s].clone(), mask[s].clone())

    def __repr__(self) -> str:
        return (
            f"ProceduralVolumesDataset(split={self.split!r}, volumes={self.num_volumes}, slices={self.num_slices}, "
            f"n={len(self)}, load_size={self.load_size}, volume_seed={self.volume_seed})"
        )


def _volume_stats(load_size: int = 64, seed: int = 0) -> tuple[tuple[float], tuple[float]]:
    """``(mean, std)`` of the train volumes' pixels (how ``VOLUME_MEAN``/``VOLUME_STD`` were measured)."""
    ds = ProceduralVolumesDataset("train", load_size, volume_seed=seed)
    x = torch.stack([ds.volume(v)[0] for v in range(ds.num_volumes)]).double()
    return (round(x.mean().item(), 4),), (round(x.std(unbiased=False).item(), 4),)
