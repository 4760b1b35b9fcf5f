"""Batch augmentation on the device with kornia: uint8 ``(B, C, S, S)`` in, normalized float32 out; the dense
variant crops and flips depth and masks with the images."""

from __future__ import annotations

from collections.abc import Sequence

import kornia.augmentation as K
import torch
from torch import nn


def _crop_flip(size: tuple[int, int], scale: Sequence[float], ratio: Sequence[float], hflip: bool) -> list[nn.Module]:
    """RandomResizedCrop to ``size`` (bilinear) and, when ``hflip``, a horizontal flip with p=0.5."""
    ops: list[nn.Module] = [
        K.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), resample="bilinear", align_corners=False)
    ]
    if hflip:
        ops.append(K.RandomHorizontalFlip(p=0.5))
    return ops


def _unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]; floating inputs are taken to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.is_floating_point():
        return images.float()
    raise TypeError(f"expected uint8 (or float in [0, 1]) images, got {images.dtype}")


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if len(mean) != len(std):
        raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class BatchAugment(nn.Module):
    """uint8 ``(B, C, S, S)`` -> float32 ``(B, C, image_size, image_size)``, normalized with ``mean``/``std``.

    ``train=True``: pixels to [0, 1], RandomResizedCrop to ``image_size`` (``scale``, ``ratio``, bilinear), a
    horizontal flip with p=0.5 when ``hflip``, normalize. The crop and flip parameters are drawn per image from
    torch's global CPU RNG (kornia's default, also for inputs on the GPU), so restoring ``torch.set_rng_state``
    reproduces them exactly. ``scale=(1, 1), ratio=(1, 1), hflip=False`` is deterministic: the identity crop.

    ``train=False``: pixels to [0, 1], a bilinear (antialiased) resize to ``image_size`` when ``S != image_size``,
    normalize; no randomness. The mode is fixed here: ``nn.Module.train()/eval()`` do not change it.

    Floating inputs are taken to be in [0, 1] already.
    """

    def __init__(
        self,
        image_size: int,
        *,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
    ):
        super().__init__()
        self.mean, self.std = _check_stats(mean, std)
        self.image_size = int(image_size)
        self.random = bool(train)  # not ``self.train``: that is nn.Module's method
        size = (self.image_size, self.image_size)
        if self.random:
            self.augment = nn.Sequential(*_crop_flip(size, scale, ratio, hflip))
            self.resize = None
        else:
            self.augment = None
            self.resize = K.Resize(size, resample="bilinear", align_corners=False, antialias=True)
        self.normalize = K.Normalize(mean=self.mean, std=self.std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, S, S)`` -> float32 ``(B, C, image_size, image_size)``."""
        if images.ndim != 4 or images.shape[1] != len(self.mean):
            raise ValueError(f"expected images of shape (B, {len(self.mean)}, S, S), got {tuple(images.shape)}")
        x = _unit_float(images)
        if x.shape[0] == 0:
            return x.new_zeros(0, x.shape[1], self.image_size, self.image_size)
        if self.augment is not None:
            x = self.augment(x)
        elif x.shape[-2:] != (self.image_size, self.image_size):
            x = self.resize(x)
        return self.normalize(x).float().contiguous()

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, train={self.random}, mean={self.mean}, std={self.std}"


class JointAugment(nn.Module):
    """The dense counterpart of :class:`BatchAugment`: the same crop and flip for images, depth and masks.

    ``forward(images uint8 (B, C, H, W), depth float (B, H, W) | None, mask int64 (B, H, W) | None)`` returns
    ``(images float32 (B, C, h, w) normalized, depth float32 (B, h, w) | None, mask int64 (B, h, w) | None)`` with
    ``(h, w) = image_size`` (an int is square).

    ``train=True``: one kornia ``AugmentationSequential`` (RandomResizedCrop with ``scale``/``ratio``, then a
    horizontal flip with p=0.5 when ``hflip``) draws per-sample parameters once and applies them to all three: the
    image bilinear, depth and mask nearest (masks go through as float, exact for ids below 2**24, and come back as
    int64). The parameters come from torch's global CPU RNG, so restoring ``torch.set_rng_state`` reproduces them.

    ``train=False``: the image is resized (bilinear, antialiased) to ``image_size`` when it differs; depth and mask
    are returned at their own resolution (metrics are computed there; upsample the predictions to it). No randomness.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        *,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
    ):
        super().__init__()
        self.mean, self.std = _check_stats(mean, std)
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.image_size = (int(h), int(w))
        self.random = bool(train)  # not ``self.train``: that is nn.Module's method
        if self.random:
            # data keys are given per call, since depth or mask may be absent
            ops = _crop_flip(self.image_size, scale, ratio, hflip)
            self.augment = K.AugmentationSequential(*ops, data_keys=None)
            self.resize = None
        else:
            self.augment = None
            self.resize = K.Resize(self.image_size, resample="bilinear", align_corners=False, antialias=True)
        self.normalize = K.Normalize(mean=self.mean, std=self.std)

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, depth: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """uint8 ``(B, C, H, W)``, ``(B, H, W)``, ``(B, H, W)`` -> float32 ``(B, C, h, w)``, ``(B, h, w)``, int64
        ``(B, h, w)`` in training; depth and mask keep ``(H, W)`` in evaluation."""
        if images.ndim != 4 or images.shape[1] != len(self.mean):
            raise ValueError(f"expected images of shape (B, {len(self.mean)}, H, W), got {tuple(images.shape)}")
        b, _, H, W = images.shape
        for name, t in (("depth", depth), ("mask", mask)):
            if t is not None and tuple(t.shape) != (b, H, W):
                raise ValueError(f"expected {name} of shape {(b, H, W)} to match the images, got {tuple(t.shape)}")
        x = _unit_float(images)
        depth = None if depth is None else depth.float()
        mask = None if mask is None else mask.long()
        if b == 0:
            empty = x.new_zeros(0, *self.image_size)
            if self.augment is not None:  # eval keeps the labels' resolution
                depth = None if depth is None else empty
                mask = None if mask is None else empty.long()
            return x.new_zeros(0, x.shape[1], *self.image_size), depth, mask
        if self.augment is None:
            if x.shape[-2:] != self.image_size:
                x = self.resize(x)
            return self.normalize(x).float().contiguous(), depth, mask
        inputs, keys = [x], ["input"]
        for t in (depth, mask):
            if t is not None:
                inputs.append(t.float().unsqueeze(1))  # (B, 1, H, W); the "mask" key resamples nearest
                keys.append("mask")
        out = self.augment(*inputs, data_keys=keys)
        out = [out] if isinstance(out, torch.Tensor) else list(out)
        x = out.pop(0)
        if depth is not None:
            depth = out.pop(0).squeeze(1).contiguous()
        if mask is not None:
            mask = out.pop(0).squeeze(1).round().long()
        return self.normalize(x).float().contiguous(), depth, mask

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, train={self.random}, mean={self.mean}, std={self.std}"


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``x * std + mean`` per channel, clamped to [0, 1], for plotting; ``x`` is ``(B, C, H, W)`` or ``(C, H, W)``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)
