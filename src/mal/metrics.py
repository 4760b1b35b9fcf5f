"""Dense prediction metrics on torchmetrics states (accumulate over batches, sync across DDP ranks).

* :class:`SegmentationMetrics`: mIoU and pixel accuracy from the dataset-wide confusion matrix (mmseg's
  convention).
* :class:`DepthMetrics`: RMSE, AbsRel and δ<1.25 per image, averaged over images (Eigen et al. 2014, NYU).

Both are ``nn.Module``\\ s (``.to(device)`` moves their states) with ``update`` / ``compute`` / ``reset``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix


class SegmentationMetrics(nn.Module):
    """Semantic segmentation mIoU / pixel accuracy over ``num_classes`` classes; ``ignore_index`` pixels are skipped.

    ``update(pred, target)``: ``pred`` logits ``(B, K, H, W)`` or class ids ``(B, H, W)``, ``target`` ``(B, H, W)``
    int64 class ids or ``ignore_index``. ``compute()`` (all in percent):

    * ``iou_per_class``: ``TP / (TP + FP + FN)`` per class from the confusion matrix summed over every update;
      ``nan`` for a class absent from both prediction and ground truth (union 0);
    * ``miou``: mean of the non-nan per-class IoUs (a class predicted but never labelled counts as 0);
    * ``pixel_acc``: correct / labelled pixels.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.dim() == 4:
            if pred.shape[1] != self.num_classes:
                raise ValueError(f"logits have {pred.shape[1]} classes, expected {self.num_classes}")
            pred = pred.argmax(dim=1)  # (B, H, W)
        if pred.shape != target.shape or target.dim() != 3:
            raise ValueError(
                f"expected pred (B, K, H, W) or (B, H, W) and target (B, H, W), "
                f"got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        self.confmat.update(pred.long(), target.long())

    def confusion(self) -> torch.Tensor:
        """``(K, K)`` int64 pixel counts, rows = ground truth, columns = prediction (synced across ranks)."""
        return self.confmat.compute()

    def compute(self) -> dict[str, float | list[float]]:
        cm = self.confusion().double()
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
        labelled = cm.sum()
        return {
            "miou": 100 * iou.nanmean().item(),
            "pixel_acc": 100 * (tp.sum() / labelled).item() if labelled > 0 else math.nan,
            "iou_per_class": (100 * iou).tolist(),
        }

    def reset(self) -> None:
        self.confmat.reset()


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
