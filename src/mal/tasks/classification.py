"""Image classification: the soft-target loss with mixup / cutmix and label smoothing, the one evaluator (top-1 /
top-k counted per sample, per-class accuracy, confusion matrix, loss) that fine-tuning's validation and ``mal eval``
both use, class-subset and ReaL label files, and the confusion plot.

Mixup / CutMix are written here rather than taken from kornia: kornia's ``RandomMixUpV2`` draws the mixing weight
uniformly from a range, while the MAE/ARM recipe needs ``lambda ~ Beta(alpha, alpha)`` and timm's per-batch switch
between mixup and cutmix (with the cutmix weight corrected to the pasted box's true area). Randomness comes from
torch's global RNG, which the engine reseeds every step (exact resume).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mal.data import BatchAugment, collate
from mal.io import atomic_write, pyplot


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


class ClassificationEvaluator:
    """Accumulates ``(logits (B, n), labels (B,))`` batches and reports, counted per sample (micro averages, so the
    result does not depend on how the split is cut into batches): ``top1``, ``top{k}`` (k = min(5, n)) in percent,
    ``loss`` (mean cross-entropy), and with ``detail=True`` ``per_class`` (percent) and ``confusion`` (counts, rows =
    true class)."""

    def __init__(self, num_classes: int, *, detail: bool = False) -> None:
        self.k = min(5, num_classes)
        self.top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.topk = MulticlassAccuracy(num_classes, top_k=self.k, average="micro")
        self.detail = detail
        if detail:
            self.per_class = MulticlassAccuracy(num_classes, top_k=1, average=None)
            self.confusion = MulticlassConfusionMatrix(num_classes)
        self.loss_sum, self.count = 0.0, 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.float().cpu(), labels.cpu()
        metrics = (self.top1, self.topk, *((self.per_class, self.confusion) if self.detail else ()))
        for metric in metrics:
            metric.update(logits, labels)
        self.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        self.count += labels.shape[0]

    def compute(self) -> dict[str, Any]:
        """Percentages rounded to two decimals (float32 states carry noise beyond them)."""
        out: dict[str, Any] = {
            "top1": round(float(self.top1.compute()) * 100, 2),
            f"top{self.k}": round(float(self.topk.compute()) * 100, 2),
            "loss": self.loss_sum / max(self.count, 1),
        }
        if self.detail:
            out["per_class"] = [round(float(v) * 100, 2) for v in self.per_class.compute()]
            out["confusion"] = self.confusion.compute().tolist()
        return out


@torch.no_grad()
def evaluate_models(
    models: dict[str, nn.Module], batches: Iterable[dict[str, torch.Tensor]], num_classes: int
) -> dict[str, float]:
    """Fine-tuning's validation: every model (keys prefix its metrics, e.g. ``""`` and ``"ema_"``) over prepared
    ``batches`` (``images``, ``labels``); the loss of the ``""`` model."""
    evaluators = {p: ClassificationEvaluator(num_classes) for p in models}
    for batch in batches:
        for p, m in models.items():
            evaluators[p].update(m(batch["images"]), batch["labels"])
    out: dict[str, float] = {}
    for p, ev in evaluators.items():
        res = ev.compute()
        if not p:
            out["loss"] = res["loss"]
        out.update({f"{p}{k}": v for k, v in res.items() if k != "loss"})
    return out


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: Dataset,
    *,
    image_size: int,
    eval_crop: float | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    class_indices: torch.Tensor | None = None,
    real_labels: list[list[int]] | None = None,
) -> dict[str, Any]:
    """``mal eval``: run ``model`` (``(B, C, S, S) -> (B, num_classes)``) over ``dataset`` (uint8 images, with
    ``mean``/``std``/``num_classes``) with the eval transform of the run's validation (:class:`BatchAugment`:
    resize to ``image_size``, or with ``eval_crop``, the run's ``data.eval_crop``, resize and centre crop). Returns
    ``top1``, ``top5`` (percent), ``loss``, ``per_class`` (percent), ``confusion`` (``(n, n)`` counts, rows = true
    class), ``images``, ``img_per_s`` (model time only). The numbers are those of :class:`ClassificationEvaluator`,
    as in the run's own validation.

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
    augment = BatchAugment(image_size, train=False, eval_crop=eval_crop, mean=dataset.mean, std=dataset.std)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    evaluator = ClassificationEvaluator(n, detail=True)
    was_training = model.training
    model.eval().to(device)
    seconds = 0.0
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
        evaluator.update(logits, labels)
    model.train(was_training)
    extra = {"real_top1": 100 * real_hits / max(real_count, 1), "real_images": real_count} if real_labels else {}
    count = evaluator.count
    return {**extra, **evaluator.compute(), "images": count,
            "img_per_s": count / seconds if seconds > 0 else float("nan")}  # fmt: skip


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


def save_confusion_plot(
    confusion: list[list[int]], classes: list[str], path: str | Path, title: str = ""
) -> Path | None:
    """Row-normalized confusion matrix as a PNG (class names on the axes up to 30 classes)."""
    plt = pyplot()
    if plt is None:
        return None

    m = torch.tensor(confusion, dtype=torch.float64)
    m = m / m.sum(1, keepdim=True).clamp(min=1)
    n = m.shape[0]
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.35 * n), min(11, 1.6 + 0.33 * n)))
    im = ax.imshow(m.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046).set_label("fraction of the true class's images")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return Path(path)
