"""Evaluation of a classifier on a dataset split: top-1/top-5, per-class accuracy, confusion matrix, throughput;
class-subset datasets (ImageNet-A/-R: 200 classes read from 1000-way logits) and ReaL-style multi-label accuracy."""

from __future__ import annotations

import json
import time
from pathlib import Path
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
    class_indices: torch.Tensor | None = None,
    real_labels: list[list[int]] | None = None,
) -> dict[str, Any]:
    """Run ``model`` (``(B, C, S, S) -> (B, num_classes)``) over ``dataset`` (uint8 images, with ``mean``/``std``/
    ``num_classes``) with the eval transform. Returns ``top1``, ``top5`` (percent), ``per_class`` (percent),
    ``confusion`` (``(n, n)`` counts, rows = true class), ``images``, ``img_per_s`` (model time only).

    ``class_indices`` (``(n_dataset_classes,)``): the model's logit index of each dataset class; predictions are
    made among those logits only (the ImageNet-A/-R protocol). ``real_labels``: per image (dataset order) the list
    of correct model classes (ImageNet-ReaL); adds ``real_top1`` over the images with a non-empty list.
    """
    n = dataset.num_classes
    if class_indices is not None and len(class_indices) != n:
        raise ValueError(f"class map has {len(class_indices)} entries, the dataset has {n} classes")
    if real_labels is not None and len(real_labels) != len(dataset):
        raise ValueError(f"ReaL labels list {len(real_labels)} images, the dataset has {len(dataset)}")
    real_hits, real_count, offset = 0, 0, 0
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
        if real_labels is not None:
            if batch["num_bad"]:
                raise ValueError("ReaL evaluation needs every image readable (labels are matched by position)")
            pred = logits.argmax(-1).tolist()
            for i, p in enumerate(pred):
                valid = real_labels[offset + i]
                if valid:
                    real_hits += int(p in valid)
                    real_count += 1
            offset += len(pred)
        if class_indices is not None:
            logits = logits[:, class_indices]
        for metric in (top1, topk, per_class, confusion):
            metric.update(logits, labels)
        count += labels.shape[0]
    model.train(was_training)
    extra = {"real_top1": 100 * real_hits / max(real_count, 1), "real_images": real_count} if real_labels else {}
    return {
        **extra,
        "top1": float(top1.compute()) * 100,
        f"top{k}": float(topk.compute()) * 100,
        "per_class": [float(v) * 100 for v in per_class.compute()],
        "confusion": confusion.compute().tolist(),
        "images": count,
        "img_per_s": count / seconds if seconds > 0 else float("nan"),
    }


def load_class_map(path: str | Path, dataset_classes: list[str], num_logits: int) -> torch.Tensor:
    """``(n_dataset_classes,)`` logit index per dataset class from a JSON ``{"class name": index}`` or a text file of
    ``class_name index`` lines (e.g. ImageNet-R's 200 wnids -> their ImageNet-1K indices)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class map not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        mapping = {str(k): int(v) for k, v in json.loads(text).items()}
    else:
        mapping = {}
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                parts = line.split()
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise ValueError(f"{path}:{i}: expected 'class_name index', got {line!r}")
                mapping[parts[0]] = int(parts[1])
    missing = [c for c in dataset_classes if c not in mapping]
    if missing:
        raise ValueError(f"class map {path} has no entry for dataset classes {missing[:5]}")
    idx = torch.tensor([mapping[c] for c in dataset_classes])
    if bool(((idx < 0) | (idx >= num_logits)).any()):
        raise ValueError(f"class map {path} has indices outside the model's {num_logits} classes")
    return idx


def load_real_labels(path: str | Path) -> list[list[int]]:
    """ImageNet-ReaL ``real.json``: one list of correct classes per validation image (sorted file order)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not all(isinstance(x, list) for x in data):
        raise ValueError(f"{path}: expected a JSON list of label lists")
    return [[int(v) for v in x] for x in data]


def save_confusion_plot(confusion: list[list[int]], classes: list[str], path: str | Path, title: str = "") -> Path:
    """Row-normalized confusion matrix as a PNG (class names on the axes up to 30 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mal.io import atomic_write

    m = torch.tensor(confusion, dtype=torch.float64)
    m = m / m.sum(1, keepdim=True).clamp(min=1)
    n = m.shape[0]
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.35 * n), min(11, 1.6 + 0.33 * n)))
    im = ax.imshow(m.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return Path(path)
