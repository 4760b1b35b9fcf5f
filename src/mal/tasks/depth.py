"""Monocular depth: the masked loss (metres or log-metres), RMSE / AbsRel / delta<1.25, and the colours of a depth map.

Depth 0 marks a pixel without depth. The loss averages per sample over its labelled pixels, then over the samples
that have any, so a sample without depth adds nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics import MeanMetric

#: Depths are clamped to at least this many metres (the log of the loss and the metrics' ratios).
MIN_DEPTH = 1e-3


def depth_loss(pred: torch.Tensor, depth: torch.Tensor, *, log: bool = False) -> torch.Tensor:
    """Masked MSE. ``pred (B, 1, H, W)`` (metres, or log-metres when ``log``), ``depth (B, H, W)`` in metres with
    0 = unlabelled. Mean over each sample's labelled pixels, then over samples with any; 0 (with a graph) if none."""
    pred = pred.float().flatten(1)
    depth = depth.float().flatten(1)
    valid = depth > 0
    target = depth.clamp_min(MIN_DEPTH).log() if log else depth
    err = torch.where(valid, (pred - target).pow(2), 0.0)
    has = valid.any(dim=1)
    if not bool(has.any()):
        return pred.sum() * 0.0
    per_sample = err.sum(dim=1) / valid.sum(dim=1).clamp_min(1)
    return per_sample[has].mean()


def depth_output_bias(depth: float, *, log: bool = False) -> float:
    """Initial value of a depth head's output for a typical ``depth`` in metres (its log with ``log``), so the
    depth loss starts near the data's spread rather than its squared mean."""
    return math.log(depth) if log else depth


class DepthMetrics(nn.Module):
    """Monocular depth RMSE, AbsRel and δ<1.25, per image then averaged over images (the NYU convention).

    ``update(pred, target)``: ``(B, H, W)`` or ``(B, 1, H, W)`` depths (same units, e.g. metres). Valid pixels:
    ``target > min_depth`` (and ``target < max_depth`` when given); predictions are clamped to
    ``[min_depth, max_depth]`` (only ``>= min_depth`` without ``max_depth``) before every metric. Per image:
    ``rmse = sqrt(mean((pred - gt)^2))``, ``abs_rel = mean(|pred - gt| / gt)``,
    ``delta1 = mean(max(pred / gt, gt / pred) < 1.25)``; images without a valid pixel are skipped.
    ``compute() -> {"rmse", "abs_rel", "delta1" (percent)}`` (``nan`` before any valid image).
    """

    def __init__(self, min_depth: float = 1e-3, max_depth: float | None = None) -> None:
        super().__init__()
        self.min_depth, self.max_depth = min_depth, max_depth
        # "disable": a nan prediction shows up as a nan metric instead of being dropped
        self.rmse = MeanMetric(nan_strategy="disable")
        self.abs_rel = MeanMetric(nan_strategy="disable")
        self.delta1 = MeanMetric(nan_strategy="disable")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.dim() == 4 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if pred.shape != target.shape or target.dim() != 3:
            raise ValueError(
                f"expected pred and target (B, H, W) or (B, 1, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        gt = target.flatten(1).double()  # (B, HW)
        valid = gt > self.min_depth
        if self.max_depth is not None:
            valid &= gt < self.max_depth
        n = valid.sum(1)  # (B,)
        keep = n > 0
        if not bool(keep.any()):
            return
        pr = pred.flatten(1).double().clamp(min=self.min_depth, max=self.max_depth)
        gt = torch.where(valid, gt, 1.0)  # invalid pixels: any positive value, masked below
        err = pr - gt
        ratio = torch.maximum(pr / gt, gt / pr)
        n = n[keep]

        def per_image(x: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, x, 0.0)[keep].sum(1) / n

        self.rmse.update(per_image(err.square()).sqrt())
        self.abs_rel.update(per_image(err.abs() / gt))
        self.delta1.update(100 * per_image((ratio < 1.25).double()))

    def compute(self) -> dict[str, float]:
        return {name: getattr(self, name).compute().item() for name in ("rmse", "abs_rel", "delta1")}

    def reset(self) -> None:
        for m in (self.rmse, self.abs_rel, self.delta1):
            m.reset()


def colorize_depth(depth: torch.Tensor, max_depth: float) -> torch.Tensor:
    """``(B, H, W)`` metres -> ``(B, 3, H, W)`` in [0, 1] (near = bright); 0 (no depth) is black."""
    d = depth.float().cpu()
    scaled = (d / max_depth).clamp(0, 1)
    try:
        import matplotlib
    except ImportError:  # without the plots extra: grey, near = bright
        rgb = (1 - scaled)[..., None].expand(*scaled.shape, 3).clone()
    else:
        rgb = torch.from_numpy(matplotlib.colormaps["magma_r"](scaled.numpy())[..., :3]).float()
    rgb[d <= 0] = 0.0
    return rgb.permute(0, 3, 1, 2)
