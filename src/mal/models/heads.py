"""Dense prediction heads over ViL token features (docs/DESIGN.md, 'Dense heads').

The heads take token *grids*: the caller un-serializes the encoder's tokens to raster order
(:func:`mal.tokens.unserialize`) and reshapes them with :func:`tokens_to_grid` to ``(B, D, gh, gw)``.

* :class:`LinearDenseHead`: LayerNorm + one linear map per token, unpatchified to full resolution (the light
  head of multi-task pretraining and of quick fine-tuning runs).
* :class:`UperNetHead`: the UperNet decoder (Xiao et al. 2018, "Unified Perceptual Parsing") over a feature
  pyramid built from a plain single-scale backbone by deconvolution / pooling, as in BEiT's and ViL's
  semantic segmentation setup, plus the auxiliary FCN head.
* :class:`UNetHead`: a U-Net decoder over features of several depths brought to strides ``p, p/2, ..., 2`` by
  transposed convolutions, with a convolutional stem on the image as the full-resolution skip (UNETR, Hatamizadeh
  et al. 2022; TransUNet, Chen et al. 2021): the medical segmentation head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mal.tokens import unpatchify, unserialize

NORMS = ("bn", "gn")


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Raster-order tokens ``(B, L, D)`` with ``L = gh * gw`` -> channels-first grid ``(B, D, gh, gw)``."""
    gh, gw = grid
    if tokens.dim() != 3 or tokens.shape[1] != gh * gw:
        raise ValueError(f"expected tokens (B, {gh * gw}, D) for a {gh}x{gw} grid, got shape {tuple(tokens.shape)}")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)


def encoder_grid(encoder: nn.Module, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens ``(B, L, D)`` of a ViL encoder's ``finetune`` pass, in its canonical serialized order, -> the raster
    grid ``(B, D, gh, gw)`` (``encoder.layout_for(grid).order`` gives the raster index of each position)."""
    return tokens_to_grid(unserialize(tokens, encoder.layout_for(grid).order.to(tokens.device)), grid)


def pyramid_taps(num_pairs: int, fractions: Sequence[float] = (4 / 12, 6 / 12, 8 / 12, 12 / 12)) -> list[int]:
    """0-based indices of the block pairs that feed the feature pyramid.

    Pair ``f * num_pairs`` (1-based) for each fraction ``f``, rounded to the nearest integer (halves up) and
    clamped to ``[1, num_pairs]``, minus one. The default fractions are ViL's UperNet pairs 4, 6, 8, 12 of 12
    (``[3, 5, 7, 11]``; docs/DESIGN.md, 'Dense heads'); shallow encoders may repeat a pair (2 pairs ->
    ``[0, 0, 0, 1]``, 4 -> ``[0, 1, 2, 3]``).
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    if any(not 0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1], got {tuple(fractions)}")
    return [min(max(math.floor(f * num_pairs + 0.5), 1), num_pairs) - 1 for f in fractions]


class LinearDenseHead(nn.Module):
    """LayerNorm + Linear per token to a ``p x p x out_channels`` patch, unpatchified (the head of multi-task
    pretraining: docs/DESIGN.md, 'Multi-task pretraining').

    ``forward(grid: (B, D, gh, gw)) -> (B, out_channels, gh * p, gw * p)``; token ``(i, j)`` writes exactly the
    pixel block ``[i * p : (i + 1) * p, j * p : (j + 1) * p]``, laid out as :func:`mal.tokens.patchify`.
    """

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.patch_size, self.out_channels = patch_size, out_channels
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, patch_size * patch_size * out_channels)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        b, d, gh, gw = grid.shape
        x = self.proj(self.norm(grid.flatten(2).transpose(1, 2)))  # (B, gh * gw, p * p * C)
        return unpatchify(x, self.patch_size, gh, gw, self.out_channels)  # (B, C, gh * p, gw * p)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        # 32 groups as usual; fewer when the width is not a multiple of 32, and at least 2 channels per group
        # so that the 1x1 pyramid-pooling map is still normalized over more than one value
        groups = math.gcd(32, channels)
        while groups > 1 and channels // groups < 2:
            groups //= 2
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {kind!r}; valid: {', '.join(NORMS)}")


class ConvNormAct(nn.Sequential):
    """``k x k`` conv (no bias, same padding) + norm + ReLU, as mmseg's ``ConvModule``.

    ``(B, Ci, h, w) -> (B, Co, h, w)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: str) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def init_conv_head(head: nn.Module, classifiers: Sequence[nn.Conv2d]) -> None:
    """mmcv's defaults: Kaiming-normal (fan-out, ReLU) convs, unit norms, N(0, 0.01) ``classifiers``."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for cls in classifiers:
        nn.init.normal_(cls.weight, std=0.01)
        nn.init.zeros_(cls.bias)


class UperNetHead(nn.Module):
    """UperNet over four single-scale feature grids, BEiT/ViL style, with an auxiliary FCN head.

    ``forward(feats, out_size)``: ``feats`` are four ``(B, D, gh, gw)`` grids (shallow to deep block pairs, see
    :func:`pyramid_taps`). They are rescaled to a pyramid (BEiT's "multi-level neck"):

    * level 0, ``(B, D, 4 gh, 4 gw)``: two stride-2 transposed convs with norm + GELU between;
    * level 1, ``(B, D, 2 gh, 2 gw)``: one stride-2 transposed conv;
    * level 2, ``(B, D, gh, gw)``: identity;
    * level 3, ``(B, D, ceil(gh / 2), ceil(gw / 2))``: 2x2 max-pool (``ceil_mode`` so odd grids keep their border).

    Decode head (Xiao et al. 2018, as in mmseg's ``UPerHead``): a pyramid pooling module on level 3 (adaptive
    average pools to ``pool_scales``, 1x1 conv each, upsampled and concatenated with the input, 3x3 conv),
    1x1 lateral convs on levels 0-2, a top-down pathway (bilinear upsampling + sum), 3x3 FPN convs, all levels
    upsampled to level 0 and concatenated, a 3x3 bottleneck, dropout and a 1x1 classifier. The auxiliary FCN
    head (3x3 conv block, dropout, 1x1 classifier) reads level 2 and runs in training mode only; its loss
    weight ``aux_weight`` is stored for the caller.

    Returns ``{"out": (B, out_channels, H, W), "aux": (B, out_channels, H, W) | None}`` with ``(H, W) =
    out_size`` (logits bilinearly upsampled, ``align_corners=False``).

    ``norm="bn"`` in training mode needs more than one value per channel in every norm, i.e. batch > 1 on
    the 1x1 pool of the PPM (mmseg uses SyncBN); use ``norm="gn"`` (per-sample statistics, at least two channels
    per group) for batch 1 per device.
    """

    def __init__(
        self,
        dim: int,
        out_channels: int,
        *,
        channels: int = 256,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        aux_weight: float = 0.4,
        norm: str = "bn",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        self.aux_weight = aux_weight
        self.pool_scales = tuple(pool_scales)
        # multi-level neck: plain features -> strides 4x, 2x, 1x, 0.5x of the patch grid
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            _norm(norm, dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.down2 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        # pyramid pooling module on the coarsest level
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(dim, channels, 1, norm)) for s in self.pool_scales
        )
        self.ppm_bottleneck = ConvNormAct(dim + len(self.pool_scales) * channels, channels, 3, norm)
        # FPN over levels 0-2 (level 3 is the PPM output)
        self.laterals = nn.ModuleList(ConvNormAct(dim, channels, 1, norm) for _ in range(3))
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, norm) for _ in range(3))
        self.fpn_bottleneck = ConvNormAct(4 * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, out_channels, 1)
        # auxiliary FCN head on level 2 (one conv block, no input concat: BEiT's config)
        self.aux_head = nn.Sequential(ConvNormAct(dim, channels, 3, norm), nn.Dropout2d(dropout))
        self.aux_classifier = nn.Conv2d(channels, out_channels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's defaults (:func:`init_conv_head`)."""
        init_conv_head(self, (self.classifier, self.aux_classifier))

    def pyramid(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Four ``(B, D, gh, gw)`` grids -> the levels ``(B, D, 4gh, 4gw)``, ``(B, D, 2gh, 2gw)``, ``(B, D, gh, gw)``,
        ``(B, D, ceil(gh / 2), ceil(gw / 2))``."""
        if len(feats) != 4:
            raise ValueError(f"UperNetHead expects 4 feature grids, got {len(feats)}")
        shapes = {tuple(f.shape) for f in feats}
        if len(shapes) != 1 or feats[0].dim() != 4:
            raise ValueError(f"feature grids must share one (B, D, gh, gw) shape, got {sorted(shapes)}")
        return [self.up4(feats[0]), self.up2(feats[1]), feats[2], self.down2(feats[3])]

    def _ppm(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D, h, w) -> (B, channels, h, w)``; pool scales larger than the map just repeat values."""
        pooled = [_resize(branch(x), x.shape[2:]) for branch in self.ppm]
        return self.ppm_bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, feats: Sequence[torch.Tensor], out_size: tuple[int, int]) -> dict[str, torch.Tensor | None]:
        levels = self.pyramid(feats)
        lat = [conv(x) for conv, x in zip(self.laterals, levels[:3], strict=True)]  # (B, channels, h_i, w_i)
        lat.append(self._ppm(levels[3]))
        for i in range(3, 0, -1):  # top-down: each level adds the upsampled coarser one
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, lat[:3], strict=True)] + [lat[3]]
        size = outs[0].shape[2:]  # (4 gh, 4 gw)
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(x, size) for x in outs[1:]], dim=1))
        logits = _resize(self.classifier(self.dropout(fused)), out_size)  # (B, out_channels, H, W)
        aux = None
        if self.training:
            aux = _resize(self.aux_classifier(self.aux_head(levels[2])), out_size)
        return {"out": logits, "aux": aux}


def unet_levels(patch_size: int) -> int:
    """The number of encoder taps of :class:`UNetHead`: one per octave between the patch grid and stride 2, i.e.
    ``floor(log2(patch_size))`` and at least 1 (16 px patches: 4 taps at strides 16, 8, 4, 2; 4 px: 2 taps at
    strides 4, 2; 1 px: 1 tap at stride 1)."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    return max(1, int(math.floor(math.log2(patch_size))))


def unet_taps(num_pairs: int, patch_size: int) -> list[int]:
    """0-based block pairs feeding :class:`UNetHead`, shallow to deep: evenly spaced, ending at the last pair
    (UNETR's 3, 6, 9, 12 of 12 for 16 px patches; 2 and 4 of 4 for mal_micro's 4 px patches)."""
    n = unet_levels(patch_size)
    return pyramid_taps(num_pairs, [(k + 1) / n for k in range(n)])


def _double_conv(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        ConvNormAct(in_channels, out_channels, 3, norm), ConvNormAct(out_channels, out_channels, 3, norm)
    )


class UNetHead(nn.Module):
    """A U-Net decoder over a plain ViT/ViL encoder (UNETR's design in 2-D, with TransUNet's decoder blocks).

    ``forward(feats, image)``: ``feats`` are ``n = unet_levels(patch_size)`` grids ``(B, D, gh, gw)`` from
    :func:`unet_taps` (shallow to deep), ``image`` the model input ``(B, in_chans, H, W)`` with ``(H, W) = p * (gh,
    gw)``. Level ``k`` (``k = 0`` the deepest) lives at stride ``p / 2**k``, width ``w_k = max(channels >> k, 16)``:

    * skips: the deepest grid through a 3x3 conv block (``D -> w_0``); the tap of level ``k >= 1`` (the ``k``-th
      shallowest from the deepest) through ``k`` stride-2 transposed convs with norm + ReLU (``D -> w_k``, UNETR's
      ``PrUp`` blocks), so the shallowest tap lands at stride 2 for 16 px patches;
    * stem: two 3x3 conv blocks on the image (``in_chans -> w_n``), the full-resolution skip that a patch encoder
      does not have;
    * decoder: from the deepest level up, a 2x2 stride-2 transposed conv (then a bilinear resize when the skip's
      size is not exactly twice, for patch sizes that are not powers of two), concatenation with the skip, two 3x3
      conv blocks; after the last level the same up to the stem's resolution;
    * dropout and a 1x1 classifier at full resolution.

    Returns ``{"out": (B, out_channels, H, W), "aux": None}``.
    """

    def __init__(
        self,
        dim: int,
        out_channels: int,
        *,
        patch_size: int,
        in_chans: int = 3,
        channels: int = 256,
        dropout: float = 0.1,
        norm: str = "bn",
        min_channels: int = 16,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        self.levels = unet_levels(patch_size)
        self.patch_size = patch_size
        n = self.levels
        widths = [max(channels >> k, min_channels) for k in range(n + 1)]  # w_0 .. w_n (w_n: the stem)
        self.widths = widths

        def pr_up(k: int) -> nn.Sequential:  # (B, D, gh, gw) -> (B, w_k, 2**k gh, 2**k gw)
            layers: list[nn.Module] = []
            for i in range(k):
                layers += [nn.ConvTranspose2d(dim if i == 0 else widths[k], widths[k], 2, stride=2),
                           _norm(norm, widths[k]), nn.ReLU(inplace=True)]  # fmt: skip
            return nn.Sequential(*layers)

        self.bottom = ConvNormAct(dim, widths[0], 3, norm)
        self.skips = nn.ModuleList(pr_up(k) for k in range(1, n))
        self.stem = _double_conv(in_chans, widths[n], norm)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(widths[k - 1], widths[k], 2, stride=2) for k in range(1, n + 1))
        self.blocks = nn.ModuleList(_double_conv(2 * widths[k], widths[k], norm) for k in range(1, n + 1))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(widths[n], out_channels, 1)
        init_conv_head(self, ())
        # PyTorch's default for the classifier (as TransUNet's and UNETR's heads): mmcv's N(0, 0.01) on a map this
        # narrow makes the logits grow too slowly for short runs (measured: no small organ in 200 steps)
        self.classifier.reset_parameters()

    def forward(self, feats: Sequence[torch.Tensor], image: torch.Tensor) -> dict[str, torch.Tensor | None]:
        n = self.levels
        if len(feats) != n:
            raise ValueError(f"UNetHead with {self.patch_size} px patches expects {n} feature grids, got {len(feats)}")
        h, w = image.shape[-2:]
        gh, gw = feats[-1].shape[-2:]
        if (gh * self.patch_size, gw * self.patch_size) != (h, w):
            raise ValueError(f"a {gh}x{gw} grid of {self.patch_size} px patches does not cover the {h}x{w} image")
        # skips[k - 1] reads the k-th grid from the deepest: the shallower the tap, the finer its stride
        skips = [skip(f) for skip, f in zip(self.skips, feats[-2::-1], strict=True)]  # (B, w_k, 2**k gh, 2**k gw)
        skips.append(self.stem(image))  # (B, w_n, H, W)
        x = self.bottom(feats[-1])  # (B, w_0, gh, gw)
        for up, block, skip in zip(self.ups, self.blocks, skips, strict=True):
            x = up(x)
            if x.shape[-2:] != skip.shape[-2:]:
                x = _resize(x, skip.shape[-2:])
            x = block(torch.cat([x, skip], dim=1))  # (B, w_k, h_k, w_k)
        return {"out": self.classifier(self.dropout(x)), "aux": None}  # (B, out_channels, H, W)
