"""Encoders as backbones for dense prediction: raster feature maps of chosen layers (timm's ``features_only``) and
the simple feature pyramid of ViTDet (Li et al. 2022, "Exploring Plain Vision Transformer Backbones for Object
Detection") that detectors read.

A plain encoder has one stride, its patch size. :class:`FeatureEncoder` gives the outputs of chosen layers as
``(B, D, H / p, W / p)`` maps in raster order, whatever the token layout, for inputs of any size (padded on the right
and bottom to a multiple of the patch size; positions are interpolated and the pretraining's cluster grid is kept,
as in classification fine-tuning). :class:`SimpleFeaturePyramid` turns the last map into maps of strides 4, 8, 16 and
32 (transposed convolutions up, max-pooling down) plus a stride-64 level by subsampling, ``out_channels`` wide each:
the ``OrderedDict`` of names ``"0"``..``"3"``, ``"pool"`` that torchvision's detectors take from a backbone.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mal.models.base import WithEncoder
from mal.tokens import unserialize


def raster_intermediates(
    encoder: nn.Module, x: torch.Tensor, indices: Sequence[int], *, norm_last: bool = True
) -> list[torch.Tensor]:
    """The outputs of encoder layers ``indices`` (0-based, sorted or not) for ``x (B, C, H, W)`` as raster grids
    ``(B, D, H / p, W / p)``, in ``finetune`` mode. The last layer's output is taken after the final norm when
    ``norm_last`` (what the encoder's ``forward`` returns), the others as they leave their layer."""
    grid = encoder.patch_embed.grid(x)
    last = encoder.num_layers - 1
    inner = sorted({i for i in indices if i != last or not norm_last})
    final, feats = encoder.forward_intermediates(x, inner, mode="finetune")
    by_index = dict(zip(inner, feats, strict=True))
    if norm_last:
        by_index[last] = final
    order = encoder.layout_for(grid).order.to(x.device)
    out = []
    for i in indices:
        t = unserialize(by_index[i], order)  # (B, L, D) raster
        out.append(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid))
    return out


def pad_to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` zero-padded on the right and bottom to multiples of ``patch``."""
    h, w = x.shape[-2:]
    ph, pw = -h % patch, -w % patch
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class FeatureEncoder(WithEncoder):
    """An encoder that returns feature maps (timm's ``features_only``): ``forward(x (B, C, H, W))`` -> a list of
    ``(B, D, ceil(H / p), ceil(W / p))``, one per layer of ``out_indices`` (0-based, negative from the end; the
    last layer after the final norm). ``feature_info``: per map ``{"num_chs", "reduction", "module"}``."""

    def __init__(self, encoder: nn.Module, out_indices: int | Sequence[int] = (-1,)) -> None:
        super().__init__()
        self.encoder = encoder
        n = encoder.num_layers
        picked = list(range(n - out_indices, n)) if isinstance(out_indices, int) else list(out_indices)
        bad = [i for i in picked if not -n <= i < n]
        if bad or not picked:
            raise ValueError(f"out_indices {out_indices}: the encoder has layers 0..{n - 1} (or -{n}..-1)")
        self.out_indices = [i % n for i in picked]
        patch, dim = encoder.cfg.patch_size, encoder.cfg.dim
        self.feature_info = [{"num_chs": dim, "reduction": patch, "module": f"encoder.blocks.{i}"}
                             for i in self.out_indices]  # fmt: skip

    @property
    def cfg(self) -> Any:
        return self.encoder.cfg

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = pad_to_patches(x, self.encoder.cfg.patch_size)
        return raster_intermediates(self.encoder, x, self.out_indices)

    def mal_card(self) -> dict[str, Any]:
        """The encoder's description (a feature encoder is its encoder, read differently)."""
        return self.encoder.mal_card()


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map (ViTDet's and ConvNeXt's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _rescale(dim: int, factor: float) -> tuple[nn.Module, int]:
    """ViTDet's rescaling of a map by a power-of-two ``factor``: transposed convolutions up (each halving the
    channels, LayerNorm + GELU between), identity, or max-pooling down. Returns the module and its width."""
    if factor == 1:
        return nn.Identity(), dim
    if factor < 1:
        k = round(1 / factor)
        return nn.MaxPool2d(k, stride=k, ceil_mode=True), dim
    layers: list[nn.Module] = []
    width = dim
    for j in range(round(math.log2(factor))):
        if j:
            layers += [LayerNorm2d(width), nn.GELU()]
        layers.append(nn.ConvTranspose2d(width, width // 2, 2, stride=2))
        width //= 2
    return nn.Sequential(*layers), width


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one ``(B, D, h, w)`` map of stride ``patch_size`` -> an ``OrderedDict`` of
    ``(B, out_channels, ...)`` maps of ``strides`` (names ``"0"``, ``"1"``, ...), and ``"pool"`` at twice the last
    stride (a stride-2 subsample of the last level, torchvision's ``LastLevelMaxPool``) when ``pool``.

    Each level: rescale by ``patch_size / stride`` (see :func:`_rescale`), then a 1x1 and a 3x3 convolution without
    bias, each followed by a LayerNorm over channels. Strides must be the patch size times powers of two."""

    def __init__(
        self, dim: int, patch_size: int, *, out_channels: int = 256, strides: Sequence[int] = (4, 8, 16, 32),
        pool: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        for s in strides:
            ratio = patch_size / s
            if ratio <= 0 or not math.log2(ratio).is_integer():
                raise ValueError(f"stride {s} is not the patch size {patch_size} times a power of two")
        self.strides, self.pool, self.out_channels = tuple(strides), pool, out_channels
        self.levels = nn.ModuleList()
        for s in self.strides:
            scale, width = _rescale(dim, patch_size / s)
            self.levels.append(
                nn.Sequential(
                    scale,
                    nn.Conv2d(width, out_channels, 1, bias=False),
                    LayerNorm2d(out_channels),
                    nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                    LayerNorm2d(out_channels),
                )
            )

    @property
    def names(self) -> list[str]:
        return [str(i) for i in range(len(self.strides))] + (["pool"] if self.pool else [])

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out = OrderedDict((str(i), level(x)) for i, level in enumerate(self.levels))
        if self.pool:
            out["pool"] = F.max_pool2d(out[str(len(self.levels) - 1)], kernel_size=1, stride=2)
        return out


class PyramidBackbone(WithEncoder):
    """An encoder + :class:`SimpleFeaturePyramid` on its last layer: ``forward(x (B, C, H, W))`` -> the pyramid's
    ``OrderedDict`` of ``(B, out_channels, H / s, W / s)`` maps (ceil), ``out_channels`` as an attribute, as
    torchvision's detectors want a backbone. Parameters are ``encoder.*`` (layer-wise lr decay by encoder layer)
    and ``neck.*`` (with the heads)."""

    def __init__(
        self, encoder: nn.Module, *, out_channels: int = 256, strides: Sequence[int] = (4, 8, 16, 32),
        pool: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.encoder = encoder
        cfg = encoder.cfg
        self.neck = SimpleFeaturePyramid(cfg.dim, cfg.patch_size, out_channels=out_channels, strides=strides, pool=pool)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = pad_to_patches(x, self.encoder.cfg.patch_size)
        return self.neck(raster_intermediates(self.encoder, x, [self.encoder.num_layers - 1])[0])


__all__ = [
    "FeatureEncoder",
    "LayerNorm2d",
    "PyramidBackbone",
    "SimpleFeaturePyramid",
    "pad_to_patches",
    "raster_intermediates",
]
