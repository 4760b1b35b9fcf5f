"""Mixup / CutMix with soft targets and label smoothing, on batches.

Written here rather than taken from kornia: kornia's ``RandomMixUpV2`` draws the mixing weight uniformly from a
range, while the MAE/ARM recipe needs ``lambda ~ Beta(alpha, alpha)`` and timm's per-batch switch between mixup and
cutmix (with the cutmix weight corrected to the pasted box's true area). Randomness comes from torch's global RNG,
which the engine reseeds every step (exact resume).
"""

from __future__ import annotations

import math

import torch


def one_hot_smooth(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """``(B,)`` int labels -> ``(B, num_classes)`` targets: ``1 - smoothing + smoothing / n`` on the label,
    ``smoothing / n`` elsewhere (rows sum to one)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0 - smoothing + off)


class MixupCutmix:
    """``(images (B, C, H, W), labels (B,)) -> (mixed images, soft targets (B, num_classes))``.

    With probability ``prob`` a batch is mixed with its flipped copy (sample ``i`` with ``B - 1 - i``): cutmix
    with probability ``switch_prob`` when both are enabled, else mixup. ``mixup_alpha`` / ``cutmix_alpha`` = 0
    disables one. Targets are ``lam * y_i + (1 - lam) * y_{B-1-i}`` of label-smoothed one-hots.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
            raise ValueError("mixup_alpha/cutmix_alpha must be >= 0 and prob/switch_prob in [0, 1]")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def _beta(self, alpha: float) -> float:
        return float(torch.distributions.Beta(alpha, alpha).sample())

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = one_hot_smooth(labels, self.num_classes, self.label_smoothing)
        if not self.enabled or float(torch.rand(())) >= self.prob:
            return images, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or float(torch.rand(())) < self.switch_prob)
        flipped = images.flip(0)
        if use_cutmix:
            lam = self._beta(self.cutmix_alpha)
            H, W = images.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(H * cut), int(W * cut)
            cy, cx = int(torch.randint(H, ())), int(torch.randint(W, ()))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
            images = images.clone()
            images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)  # the area actually pasted
        else:
            lam = self._beta(self.mixup_alpha)
            images = images * lam + flipped * (1.0 - lam)
        return images, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))``; ``(B, n)`` both."""
    return -(targets * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
