"""Augmentation in two places.

Per sample, in the data-loader workers (:class:`SampleAugment`, datasets that decode files of any size:
``imagefolder``): torchvision's RandomResizedCrop on the full decoded image, then timm's RandAugment; uint8 out for
8-bit images, float32 for wider ones (:func:`mal.data.common.read_image`). Its randomness comes from a seed that
travels with the sample's index (the engine's ``StepSampler`` derives it from the run seed, the epoch and the index),
so it depends on neither the worker nor the number of processes.

Per batch, on the device with kornia (:class:`BatchAugment`): uint8 (or float in [0, 1]) ``(B, C, S, S)`` in,
normalized float32 out (crop unless the samples come cropped, flip, normalize, random erasing; the evaluation resize
and centre crop); randomness from torch's global RNG, which the engine reseeds every step. :class:`JointAugment`, the
dense variant, crops and flips depth and masks with the images.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import kornia.augmentation as K
import torch
from kornia.augmentation.auto import RandAugment as KorniaRandAugment
from kornia.geometry.transform import resize
from PIL import Image
from torch import nn

from mal.data.common import image_size, outside_unit, resize_image, unit_float


def _crop_flip(size: tuple[int, int], scale: Sequence[float], ratio: Sequence[float], hflip: bool) -> list[nn.Module]:
    """RandomResizedCrop to ``size`` (bilinear) and, when ``hflip``, a horizontal flip with p=0.5."""
    ops: list[nn.Module] = [
        K.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio), resample="bilinear", align_corners=False)
    ]
    if hflip:
        ops.append(K.RandomHorizontalFlip(p=0.5))
    return ops


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if len(mean) != len(std):
        raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class BatchAugment(nn.Module):
    """uint8 ``(B, C, H, W)`` -> float32 ``(B, C, image_size, image_size)``, normalized with ``mean``/``std``.

    ``train=True``: pixels to [0, 1], RandomResizedCrop to ``image_size`` (``scale``, ``ratio``, bilinear) unless
    ``crop=False`` (the samples come cropped to ``image_size`` from the loader, :class:`SampleAugment`), a
    horizontal flip with p=0.5 when ``hflip``, normalize, then random erasing with probability ``erase_prob`` per
    image (:class:`RandomErasing`). The random parameters are drawn per image from torch's global CPU RNG (kornia's
    default, also for inputs on the GPU), so restoring ``torch.set_rng_state`` reproduces them exactly.
    ``scale=(1, 1), ratio=(1, 1), hflip=False`` is deterministic: the identity crop.

    ``train=False``: pixels to [0, 1]; with ``eval_crop=None`` a bilinear (antialiased) resize to ``image_size``
    when the input differs; with ``eval_crop=c`` the shorter side is resized to ``floor(image_size / c)`` (when it
    differs) and the centre ``image_size`` square cropped (timm's ``crop_pct``: 0.875 at 224 px resizes to 256);
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
        crop: bool = True,
        erase_prob: float = 0.0,
        eval_crop: float | None = None,
    ):
        super().__init__()
        self.mean, self.std = _check_stats(mean, std)
        self.image_size = int(image_size)
        self.random = bool(train)  # not ``self.train``: that is nn.Module's method
        if eval_crop is not None and not 0 < eval_crop <= 1:
            raise ValueError(f"eval_crop must be in (0, 1], got {eval_crop}")
        self.crop = bool(crop)
        self.eval_crop = None if train else eval_crop
        size = (self.image_size, self.image_size)
        self.augment: nn.Module | None = None
        self.resize: nn.Module | None = None
        self.erase: RandomErasing | None = None
        if self.random:
            if self.crop:
                self.augment = nn.Sequential(*_crop_flip(size, scale, ratio, hflip))
            elif hflip:
                self.augment = K.RandomHorizontalFlip(p=0.5)
            self.erase = RandomErasing(erase_prob) if erase_prob > 0 else None
        elif eval_crop is None:
            self.resize = K.Resize(size, resample="bilinear", align_corners=False, antialias=True)
        self.normalize = K.Normalize(mean=self.mean, std=self.std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` -> float32 ``(B, C, image_size, image_size)``."""
        if images.ndim != 4 or images.shape[1] != len(self.mean):
            raise ValueError(f"expected images of shape (B, {len(self.mean)}, H, W), got {tuple(images.shape)}")
        size = (self.image_size, self.image_size)
        if self.random and not self.crop and images.shape[-2:] != size:
            raise ValueError(f"expected images cropped to {size} in the loader, got {tuple(images.shape[-2:])}")
        x = unit_float(images)
        if x.shape[0] == 0:
            return x.new_zeros(0, x.shape[1], *size)
        if self.random:
            if self.augment is not None:
                x = self.augment(x)
        elif self.eval_crop is not None:
            x = resize_center_crop(x, self.image_size, self.eval_crop)
        elif x.shape[-2:] != size:
            x = self.resize(x)
        x = self.normalize(x).float()
        if self.erase is not None:
            x = self.erase(x)
        return x.contiguous()

    def extra_repr(self) -> str:
        extra = ""
        if self.random:
            extra = f", crop={self.crop}" + (f", erase_prob={self.erase.p}" if self.erase is not None else "")
        elif self.eval_crop is not None:
            extra = f", eval_crop={self.eval_crop}"
        return f"image_size={self.image_size}, train={self.random}{extra}, mean={self.mean}, std={self.std}"


def resize_center_crop(x: torch.Tensor, size: int, crop: float) -> torch.Tensor:
    """The evaluation transform of timm / DeiT / MAE: the shorter side resized to ``floor(size / crop)`` (bilinear,
    antialiased; skipped when it already is), then the centre ``size x size`` (offsets rounded as torchvision's
    ``CenterCrop``). ``x``: float ``(B, C, H, W)`` -> ``(B, C, size, size)``."""
    short = math.floor(size / crop + 1e-6)  # 224 / 0.875 = 256 exactly; the epsilon guards float error
    h, w = x.shape[-2:]
    if min(h, w) != short:
        x = resize(x, short, side="short", interpolation="bilinear", align_corners=False, antialias=True)
        h, w = x.shape[-2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


class RandomErasing(nn.Module):
    """Random erasing (Zhong et al. 2020) as timm's ``RandomErasing(mode="pixel")`` in the MAE / DeiT recipe: with
    probability ``p`` per image, one box of 2-33 % of the area and aspect ratio 0.3-3.3 is filled with N(0, 1)
    noise per pixel and channel (the input is normalized, so that is noise of the data's own scale).

    The boxes are kornia's (``RandomErasing``'s parameters, drawn from torch's global RNG; a box is clamped to the
    image instead of timm's 10 rejection attempts), the fill is timm's: kornia fills a constant, so it erases a
    one-channel tensor of ones and the zeros it leaves mark the box. ``(B, C, H, W)`` float in and out.
    """

    def __init__(
        self, p: float, scale: tuple[float, float] = (0.02, 1 / 3), ratio: tuple[float, float] = (0.3, 1 / 0.3)
    ) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"erase probability must be in [0, 1], got {p}")
        self.p = float(p)
        self.boxes = K.RandomErasing(scale=scale, ratio=ratio, value=0.0, p=self.p)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.boxes(x.new_ones(x.shape[0], 1, *x.shape[-2:]))  # (B, 1, H, W): 0 inside each box
        return torch.where(keep.bool(), x, torch.randn_like(x))


class JointAugment(nn.Module):
    """The dense counterpart of :class:`BatchAugment`: the same crop and flip for images, depth and masks.

    ``forward(images uint8 (B, C, H, W), depth float (B, H, W) | None, mask int64 (B, H, W) | None)`` returns
    ``(images float32 (B, C, h, w) normalized, depth float32 (B, h, w) | None, mask int64 (B, h, w) | None)`` with
    ``(h, w) = image_size`` (an int is square).

    ``train=True``: one kornia ``AugmentationSequential`` (RandomResizedCrop with ``scale``/``ratio``, then a
    horizontal flip with p=0.5 when ``hflip``) draws per-sample parameters once and applies them to all three: the
    image bilinear, depth and mask nearest (masks go through as float, exact for ids below 2**24, and come back as
    int64); then, with ``color_jitter`` ``(brightness, contrast, saturation, hue)``, kornia's ColorJitter on the
    image alone. The parameters come from torch's global CPU RNG, so restoring ``torch.set_rng_state`` reproduces
    them.

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
        color_jitter: Sequence[float] | None = None,
    ):
        super().__init__()
        self.mean, self.std = _check_stats(mean, std)
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.image_size = (int(h), int(w))
        self.random = bool(train)  # not ``self.train``: that is nn.Module's method
        self.jitter = None
        if self.random:
            # data keys are given per call, since depth or mask may be absent
            ops = _crop_flip(self.image_size, scale, ratio, hflip)
            self.augment = K.AugmentationSequential(*ops, data_keys=None)
            self.resize = None
            if color_jitter is not None:  # the image only (mmseg's photometric distortion, ViL's ADE20K recipe)
                self.jitter = K.ColorJitter(*color_jitter, p=1.0)
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
        x = unit_float(images)
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
        if self.jitter is not None:
            x = self.jitter(x)
        return self.normalize(x).float().contiguous(), depth, mask

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, train={self.random}, mean={self.mean}, std={self.std}"


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``x * std + mean`` per channel, clamped to [0, 1], for plotting; ``x`` is ``(B, C, H, W)`` or ``(C, H, W)``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------- per sample (loader)


def random_resized_crop_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop of an ``height x width`` image: torchvision's
    ``RandomResizedCrop.get_params``, drawn from torch's global RNG. Up to 10 attempts draw an area fraction
    uniformly from ``scale`` and an aspect ratio (w / h) log-uniformly from ``ratio``, and take the first box that
    fits, at a uniform position; when none fits, the centre crop of the whole image at the nearest ratio in range.

    Written here because torchvision is not a dependency; kornia's crop generator draws its attempts as a batch and
    has no such fallback.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


#: The operations of timm's ``rand-*`` policy (``_RAND_TRANSFORMS``) as kornia RandAugment entries ``(name, low,
#: high)``: kornia's default list, whose ranges are timm's at magnitude 0..10 (kornia's 0..30), except translation,
#: set to timm's +-45 % of the side (``translate_pct``; kornia's default is +-10 %). Known differences that remain:
#: posterize keeps 4-8 bits (the AutoAugment paper's, timm's ``PosterizeOriginal``; timm's ``rand`` keeps 0-4), and
#: geometric operations fill with black (timm: the ImageNet mean colour).
RANDAUGMENT_POLICY = [
    [("auto_contrast", 0, 1)],
    [("equalize", 0, 1)],
    [("invert", 0, 1)],
    [("rotate", -30.0, 30.0)],
    [("posterize", 4.0, 8.0)],
    [("solarize", 0.0, 1.0)],
    [("solarize_add", 0.0, 0.43)],
    [("color", 0.1, 1.9)],
    [("contrast", 0.1, 1.9)],
    [("brightness", 0.1, 1.9)],
    [("sharpness", 0.1, 1.9)],
    [("shear_x", -0.3, 0.3)],
    [("shear_y", -0.3, 0.3)],
    [("translate_x", -0.45, 0.45)],
    [("translate_y", -0.45, 0.45)],
]


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's RandAugment settings: ``n`` operations per image, each applied with probability ``p`` at magnitude
    ``m`` (0..10) plus N(0, ``mstd``) noise drawn per operation, clipped to [0, ``mmax``]."""

    n: int = 2
    m: float = 9.0
    mstd: float = 0.0
    p: float = 0.5
    mmax: float = 10.0

    @classmethod
    def parse(cls, text: str) -> RandAugmentSpec:
        """timm's notation: ``"rand-m9-mstd0.5"``, optionally with ``-n<ops>``, ``-p<prob>``, ``-mmax<max>`` and
        ``-inc0``. ``inc1`` (timm's "increasing" variants) has no kornia counterpart and is refused."""
        parts = text.strip().split("-")
        if parts[0] != "rand":
            raise ValueError(f"randaugment must look like 'rand-m9-mstd0.5' (timm's notation), got {text!r}")
        values: dict[str, float] = {}
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", part)
            if match is None:
                raise ValueError(f"randaugment {text!r}: unknown part {part!r} (known: m, n, mstd, mmax, p, inc0)")
            values[match[1]] = float(match[2])
        if values.pop("inc", 0.0) != 0:
            raise ValueError(f"randaugment {text!r}: inc1 (timm's increasing variants) is not available")
        spec = cls(**{k: int(v) if k == "n" else v for k, v in values.items()})
        if not (spec.n >= 1 and 0 <= spec.m <= spec.mmax <= 10 and 0 < spec.p <= 1):
            raise ValueError(f"randaugment {text!r}: needs n >= 1, 0 <= m <= mmax <= 10, 0 < p <= 1")
        return spec


class RandAugment:
    """timm's RandAugment (Cubuk et al. 2020, timm's ``rand_augment_transform``) on one image, with kornia's
    operations: ``n`` operations drawn uniformly with replacement, each applied with probability ``p`` at a
    magnitude drawn per operation from N(m, mstd) and clipped to [0, mmax] (kornia's scale is 3x timm's).

    Per image because kornia's ``RandAugment`` picks its operations and one magnitude per call, that is per batch,
    while the recipe gives every image its own; each operation is a one-entry kornia ``RandAugment`` whose ``m`` is
    set before each call. Randomness from torch's global RNG. ``(1, C, H, W)`` float in [0, 1] in and out, clamped
    to [0, 1]; a single channel goes through as a gray RGB image (kornia's colour operation needs three).
    """

    def __init__(self, spec: RandAugmentSpec):
        self.spec = spec
        self.ops = [KorniaRandAugment(n=1, m=15, policy=[entry]) for entry in RANDAUGMENT_POLICY]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        gray = x.shape[1] == 1
        if gray:  # every operation keeps a gray image gray, so one channel of the result is the gray result
            x = x.repeat(1, 3, 1, 1)
        for _ in range(s.n):
            op = self.ops[int(torch.randint(len(self.ops), ()))]
            if s.p < 1 and float(torch.rand(())) >= s.p:
                continue
            m = s.m + s.mstd * float(torch.randn(())) if s.mstd > 0 else s.m
            op.m = 3.0 * min(max(m, 0.0), s.mmax)
            x = op(x)
        x = x.clamp(0.0, 1.0)
        return x[:, :1].contiguous() if gray else x

    def __repr__(self) -> str:
        return f"RandAugment({self.spec})"


class SampleAugment:
    """The per-sample training transform, run in the data-loader workers: an image of any size (``(C, H, W)`` uint8 or
    float32, or an 8-bit PIL image: :func:`mal.data.common.decode_image`) and a seed in, ``(C, size, size)`` out,
    uint8 for 8-bit images, float32 for float ones.

    RandomResizedCrop on the full image (:func:`random_resized_crop_box` with ``scale``, ``ratio``; PIL's bicubic
    resize of the box to ``size``, antialiased, as MAE / DeiT crop; float images channel by channel in float, the
    same filter, not clipped), then :class:`RandAugment` when ``randaugment`` is given (timm's notation,
    :meth:`RandAugmentSpec.parse`). Flip, normalization and erasing follow on the batch (:class:`BatchAugment` with
    ``crop=False``).

    RandAugment's operations are defined on [0, 1] and clip to it: uint8 images are augmented as ``x / 255`` and
    rounded back to uint8; float images are augmented as they are and stay float32 (not rounded to 8 bits; posterize
    and equalize quantize as kornia does), which needs their values in [0, 1] (16-bit files always are): a float
    image with values clearly outside it raises ``ValueError`` rather than being clipped (map it with the dataset's
    ``value_range``, or leave RandAugment out).

    Every draw comes from torch's global CPU RNG seeded with ``seed`` inside ``torch.random.fork_rng``, so the output
    is a function of (image, seed) alone and the caller's RNG states (CPU and CUDA) are left as they were (with
    ``num_workers=0`` this runs in the training process). The draws depend on the image's size only, not its kind.
    """

    def __init__(
        self,
        size: int,
        *,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        randaugment: str | None = None,
    ) -> None:
        if size < 1 or not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"bad crop settings: size {size}, scale {tuple(scale)}, ratio {tuple(ratio)}")
        self.size = int(size)
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.randaugment = None if randaugment is None else RandAugment(RandAugmentSpec.parse(randaugment))

    def __call__(self, img: Image.Image | torch.Tensor, seed: int) -> torch.Tensor:
        """``(C, H, W)`` uint8 or float (or an 8-bit PIL image: :func:`mal.data.common.decode_image`) -> ``(C, size,
        size)`` uint8 or float32."""
        width, height = image_size(img)
        if self.randaugment is not None and isinstance(img, torch.Tensor) and img.is_floating_point():
            lo, hi = (float(v) for v in torch.aminmax(img))
            if outside_unit(lo, hi):
                raise ValueError(
                    f"RandAugment needs pixel values in [0, 1] (it clips to them), got an image spanning "
                    f"[{lo:.6g}, {hi:.6g}]: set data.options.value_range=[lo, hi] to map [lo, hi] to [0, 1], or "
                    "data.randaugment=null"
                )
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed also reseeds CUDA
            top, left, h, w = random_resized_crop_box(height, width, self.scale, self.ratio)
            box = (left, top, left + w, top + h)
            x = resize_image(img, (self.size, self.size), Image.Resampling.BICUBIC, box=box)  # (C, S, S)
            if self.randaugment is not None:
                y = self.randaugment(unit_float(x)[None])[0]
                x = y.mul_(255.0).round_().to(torch.uint8) if x.dtype == torch.uint8 else y
        return x.contiguous()

    def __repr__(self) -> str:
        return f"SampleAugment(size={self.size}, scale={self.scale}, ratio={self.ratio}, {self.randaugment})"
