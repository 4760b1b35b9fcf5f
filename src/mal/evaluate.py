"""Evaluation of a classifier on a dataset split: top-1/top-5, per-class accuracy, confusion matrix, throughput."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mal.data import BatchAugment, collate


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: Dataset,
    *,
    image_size: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> dict[str, Any]:
    """Run ``model`` (``(B, C, S, S) -> (B, num_classes)``) over ``dataset`` (uint8 images, with ``mean``/``std``/
    ``num_classes``) with the eval transform. Returns ``top1``, ``top5`` (percent), ``per_class`` (percent),
    ``confusion`` (``(n, n)`` counts, rows = true class), ``images``, ``img_per_s`` (model time only)."""
    n = dataset.num_classes
    augment = BatchAugment(image_size, train=False, mean=dataset.mean, std=dataset.std)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    k = min(5, n)
    top1 = MulticlassAccuracy(n, top_k=1, average="micro")
    topk = MulticlassAccuracy(n, top_k=k, average="micro")
    per_class = MulticlassAccuracy(n, top_k=1, average=None)
    confusion = MulticlassConfusionMatrix(n)
    was_training = model.training
    model.eval().to(device)
    seconds, count = 0.0, 0
    for batch in loader:
        if batch["images"] is None:
            continue
        images = augment(batch["images"].to(device))
        t0 = time.perf_counter()
        logits = model(images).float()
        if images.is_cuda:
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        logits, labels = logits.cpu(), batch["labels"]
        for metric in (top1, topk, per_class, confusion):
            metric.update(logits, labels)
        count += labels.shape[0]
    model.train(was_training)
    return {
        "top1": float(top1.compute()) * 100,
        f"top{k}": float(topk.compute()) * 100,
        "per_class": [float(v) * 100 for v in per_class.compute()],
        "confusion": confusion.compute().tolist(),
        "images": count,
        "img_per_s": count / seconds if seconds > 0 else float("nan"),
    }
