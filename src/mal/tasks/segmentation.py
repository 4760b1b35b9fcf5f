"""Semantic segmentation: the per-pixel losses (cross-entropy, Dice + cross-entropy), mIoU / pixel accuracy and the
colours of a predicted mask.

Labels are class ids with :data:`mal.data.IGNORE_INDEX` for unlabelled pixels (the one ignore index of the project).
The cross-entropy averages per sample over its labelled pixels, then over the samples that have any, so a sample
without a mask adds nothing (multi-task pretraining mixes samples with and without masks).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from mal.data import IGNORE_INDEX


def seg_loss(logits: torch.Tensor, mask: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Masked cross-entropy. ``logits (B, K, H, W)``, ``mask (B, H, W)`` with :data:`IGNORE_INDEX` = ignore;
    averaged per sample over its labelled pixels, then over samples with any; 0 (with a graph) if none."""
    ce = F.cross_entropy(
        logits.float(), mask, ignore_index=IGNORE_INDEX, reduction="none", label_smoothing=label_smoothing
    )
    valid = (mask != IGNORE_INDEX).flatten(1)
    has = valid.any(dim=1)
    if not bool(has.any()):
        return logits.sum() * 0.0
    per_sample = ce.flatten(1).sum(dim=1) / valid.sum(dim=1).clamp_min(1)
    return per_sample[has].mean()


def dice_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss over the foreground classes (1..K-1), batch-wise (nnU-Net's "batch Dice", as TransUNet's sums
    over the batch): MONAI's ``MaskedDiceLoss`` with :data:`IGNORE_INDEX` pixels masked out of both the softmax
    probabilities and the targets. ``logits (B, K, H, W)``, ``mask (B, H, W)``; 0 (with a graph) when no pixel is
    labelled. Needs MONAI (``pip install "mal-vision[medical]"``).

    Without the background class, a masked pixel (its target zeroed, i.e. background) adds nothing: that is how the
    ignore index fits MONAI's loss, which has no ignore index of its own in the versions we support."""
    if logits.shape[1] < 2:
        raise ValueError(f"the Dice loss needs at least 2 classes (background + one), got {logits.shape[1]}")
    valid = (mask != IGNORE_INDEX)[:, None]  # (B, 1, H, W)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    target = torch.where(valid, mask[:, None], 0)  # (B, 1, H, W)
    return _masked_dice()(logits.float(), target, mask=valid)


def dice_ce_loss(logits: torch.Tensor, mask: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Dice + cross-entropy with weights 1 and 1 (MONAI's ``DiceCELoss`` and nnU-Net's default): :func:`seg_loss` +
    :func:`dice_loss`, both ignoring :data:`IGNORE_INDEX`. ``logits (B, K, H, W)``, ``mask (B, H, W)``."""
    return seg_loss(logits, mask, label_smoothing=label_smoothing) + dice_loss(logits, mask)


@functools.cache
def _masked_dice() -> nn.Module:
    try:
        from monai.losses import MaskedDiceLoss
    except ImportError:
        raise ImportError('the Dice loss (head.loss=dice_ce) needs MONAI: pip install "mal-vision[medical]"') from None
    return MaskedDiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)


#: The segmentation losses by name (``head.loss``): ``(logits (B, K, H, W), mask (B, H, W), *, label_smoothing)``.
SEG_LOSSES = {"ce": seg_loss, "dice_ce": dice_ce_loss}


class SegmentationMetrics(nn.Module):
    """Semantic segmentation mIoU / pixel accuracy over ``num_classes`` classes; ``ignore_index`` pixels are skipped.

    ``update(pred, target)``: ``pred`` logits ``(B, K, H, W)`` or class ids ``(B, H, W)``, ``target`` ``(B, H, W)``
    int64 class ids or ``ignore_index``. ``compute()`` (all in percent):

    * ``iou_per_class``: ``TP / (TP + FP + FN)`` per class from the confusion matrix summed over every update;
      ``nan`` for a class absent from both prediction and ground truth (union 0);
    * ``miou``: mean of the non-nan per-class IoUs (a class predicted but never labelled counts as 0);
    * ``pixel_acc``: correct / labelled pixels.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
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


#: matplotlib's "tab10" colours, the palette of the masks drawn for people (kept here: drawing needs no plots extra)
TAB10 = ("1f77b4", "ff7f0e", "2ca02c", "d62728", "9467bd", "8c564b", "e377c2", "7f7f7f", "bcbd22", "17becf")


def colorize_mask(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, H, W)`` class ids -> ``(B, 3, H, W)`` in [0, 1]; the ignore index is black."""
    rgb = [tuple(int(c[i : i + 2], 16) / 255 for i in (0, 2, 4)) for c in TAB10]
    palette = torch.tensor([rgb[i % 10] for i in range(max(num_classes, 1))], dtype=torch.float32)
    m = mask.long().cpu()
    out = palette[m.clamp(0, len(palette) - 1)]
    out[m == IGNORE_INDEX] = 0.0
    return out.permute(0, 3, 1, 2)
