"""Dense fine-tuning, ``mal finetune --task segmentation|depth`` (SPEC 5): the encoder in ``finetune`` mode, its
tokens put back on the patch grid, a linear or UperNet head, per-pixel losses, and mIoU / pixel accuracy or
RMSE / AbsRel / delta<1.25 computed at the labels' resolution (whole-image or sliding-window inference).

The losses (:func:`depth_loss`, :func:`seg_loss`) are shared with multi-task pretraining: both average per sample
over its labelled pixels, then over the samples that have any, so a sample without that label adds nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mal.config import from_dict, to_dict
from mal.data import denormalize
from mal.engine.logging import save_image_grid
from mal.engine.loop import seed_everything
from mal.finetune.task import (
    DenseHeadSettings,
    EncoderTask,
    FinetuneConfig,
    build_model,
    load_ema_weights,
    read_finetune_checkpoint,
)
from mal.metrics import DepthMetrics, SegmentationMetrics
from mal.models.factory import find_weights, model_from_card
from mal.models.heads import LinearDenseHead, UperNetHead, encoder_grid, pyramid_taps

IGNORE = 255
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


def seg_loss(logits: torch.Tensor, mask: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Masked cross-entropy. ``logits (B, K, H, W)``, ``mask (B, H, W)`` with 255 = ignore; averaged per sample over
    its labelled pixels, then over samples with any; 0 (with a graph) if none."""
    ce = F.cross_entropy(logits.float(), mask, ignore_index=IGNORE, reduction="none", label_smoothing=label_smoothing)
    valid = (mask != IGNORE).flatten(1)
    has = valid.any(dim=1)
    if not bool(has.any()):
        return logits.sum() * 0.0
    per_sample = ce.flatten(1).sum(dim=1) / valid.sum(dim=1).clamp_min(1)
    return per_sample[has].mean()


class DensePredictor(nn.Module):
    """ViL encoder (``finetune`` mode) + a dense head.

    ``forward(x (B, C, H, W)) -> {"out": (B, K, H, W), "aux": (B, K, H, W) or None}`` with ``K`` = classes
    (segmentation) or 1 (depth); ``aux`` only from UperNet in training mode.
    """

    def __init__(
        self, encoder: nn.Module, out_channels: int, head: DenseHeadSettings, out_bias: float | None = None
    ) -> None:
        """``out_bias``: the output's initial value (depth: a typical depth, in the head's units)."""
        super().__init__()
        self.encoder = encoder
        self.out_channels = out_channels
        self.head_settings = head
        dim, pairs = encoder.cfg.dim, encoder.num_layers
        if head.kind == "linear":
            self.taps: list[int] = [pairs - 1]
            self.head = LinearDenseHead(dim, encoder.cfg.patch_size, out_channels)
        else:
            self.taps = pyramid_taps(pairs)
            self.head = UperNetHead(dim, out_channels, channels=head.channels, dropout=head.dropout)
        self.kind = head.kind
        if out_bias is not None:
            with torch.no_grad():
                (self.head.proj if head.kind == "linear" else self.head.classifier).bias.fill_(out_bias)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def mal_card(self) -> dict[str, Any]:
        """The description saved with the weights: the encoder's, ``kind: dense``, the head and its outputs."""
        dense = {"head": to_dict(self.head_settings), "out_channels": self.out_channels}
        return {**self.encoder.mal_card(), "kind": "dense", "dense": dense}

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> DensePredictor:
        """The model a ``kind: dense`` description names, with fresh weights."""
        info = card.get("dense") or {}
        head = from_dict(DenseHeadSettings, info.get("head", {}), where="model description dense head")
        return cls(model_from_card(card, encoder_only=True), int(info["out_channels"]), head)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Grids ``(B, D, gh, gw)`` of the pairs in ``self.taps`` (the last pair after the final norm)."""
        grid = self.encoder.patch_embed.grid(x)
        last = self.encoder.num_layers - 1
        inner = sorted({t for t in self.taps if t != last})
        out, feats = self.encoder.forward_intermediates(x, inner, mode="finetune")
        by_pair = dict(zip(inner, feats, strict=True)) | {last: out}
        return [encoder_grid(self.encoder, by_pair[t], grid) for t in self.taps]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        feats = self.features(x)
        if self.kind == "linear":
            return {"out": self.head(feats[0]), "aux": None}
        return self.head(feats, x.shape[-2:])


def slide_windows(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering ``[0, size)`` with the last window flush with the end."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return [*starts, size - window]


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, out_size: tuple[int, int], *, window: int | None = None,
    stride: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Logits / depth maps ``(B, K, *out_size)`` of ``images (B, C, H, W)``: one pass (``window=None``) or the mean
    over sliding ``window x window`` crops (stride ``stride``), then bilinear resize to ``out_size``."""
    if window is None:
        out = model(images)["out"]
    else:
        B, _, H, W = images.shape
        if window > H or window > W:
            raise ValueError(f"sliding-window inference needs images of at least {window}px, got {H}x{W}")
        stride = stride or max(1, window * 2 // 3)
        out = count = None
        for y in slide_windows(H, window, stride):
            for x in slide_windows(W, window, stride):
                o = model(images[..., y : y + window, x : x + window])["out"].float()
                if out is None:
                    out = o.new_zeros(B, o.shape[1], H, W)
                    count = o.new_zeros(1, 1, H, W)
                out[..., y : y + window, x : x + window] += o
                count[..., y : y + window, x : x + window] += 1
        out = out / count
    out = out.float()
    if tuple(out.shape[-2:]) != tuple(out_size):
        out = F.interpolate(out, size=tuple(out_size), mode="bilinear", align_corners=False)
    return out


def colorize_mask(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, H, W)`` class ids -> ``(B, 3, H, W)`` in [0, 1]; 255 (ignore) is black."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    palette = torch.tensor([cmap(i % 10)[:3] for i in range(max(num_classes, 1))], dtype=torch.float32)
    m = mask.long().cpu()
    out = palette[m.clamp(0, len(palette) - 1)]
    out[m == IGNORE] = 0.0
    return out.permute(0, 3, 1, 2)


def colorize_depth(depth: torch.Tensor, max_depth: float) -> torch.Tensor:
    """``(B, H, W)`` metres -> ``(B, 3, H, W)`` in [0, 1] (near = bright); 0 (no depth) is black."""
    import matplotlib

    cmap = matplotlib.colormaps["magma_r"]
    d = depth.float().cpu()
    rgb = torch.from_numpy(cmap((d / max_depth).clamp(0, 1).numpy())[..., :3]).float()
    rgb[d <= 0] = 0.0
    return rgb.permute(0, 3, 1, 2)


class DenseEvaluator:
    """Loss, inference and metrics of one dense task, shared by training (:class:`DenseTask`) and ``mal eval``.

    ``kind``: ``segmentation`` or ``depth``; ``window``: sliding-window size (None: whole image).
    """

    def __init__(self, cfg: FinetuneConfig, num_classes: int, window: int | None = None) -> None:
        self.kind, self.head, self.recipe = cfg.task, cfg.head, cfg.recipe
        self.num_classes, self.window = num_classes, window

    @classmethod
    def for_data(cls, cfg: FinetuneConfig, dataset: Any) -> tuple[DenseEvaluator, int | tuple[int, int]]:
        """The evaluator of a run on ``dataset`` and the size its eval images are resized to: ``data.image_size``
        (whole-image inference) or the full ``data.load_size`` (sliding ``data.image_size`` windows)."""
        d = cfg.data
        slide = cfg.head.inference == "slide"
        num_classes = dataset.num_classes if cfg.task == "segmentation" else 1
        evaluator = cls(cfg, num_classes, window=d.image_size if slide else None)
        return evaluator, (d.load_size or dataset.load_size) if slide else d.image_size

    def loss(self, out: dict[str, torch.Tensor | None], label: torch.Tensor) -> torch.Tensor:
        """``label``: the mask ``(B, H, W)`` (segmentation) or the depth map ``(B, H, W)``."""
        if self.kind == "segmentation":
            ls = self.recipe.label_smoothing
            loss = seg_loss(out["out"], label, label_smoothing=ls)
            if out.get("aux") is not None and self.head.aux_weight > 0:
                loss = loss + self.head.aux_weight * seg_loss(out["aux"], label, label_smoothing=ls)
            return loss
        return depth_loss(out["out"], label, log=self.head.log_depth)

    def label(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["mask"] if self.kind == "segmentation" else batch["depth"]

    def to_depth(self, out: torch.Tensor) -> torch.Tensor:
        """Head output ``(B, 1, H, W)`` -> depth in metres ``(B, H, W)``."""
        d = out[:, 0].float()
        return d.exp() if self.head.log_depth else d.clamp_min(MIN_DEPTH)

    def predict(self, model: nn.Module, images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return predict(model, images, out_size, window=self.window, stride=self.head.slide_stride)

    @torch.no_grad()
    def run(self, models: dict[str, nn.Module], batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Metrics of every model (keys prefixed with its name) and the loss of the ``""`` model over ``batches``
        (prepared with the eval transform: labels at their own resolution)."""
        seg = self.kind == "segmentation"
        metrics = {
            p: SegmentationMetrics(self.num_classes, ignore_index=IGNORE) if seg else DepthMetrics(min_depth=MIN_DEPTH)
            for p in models
        }
        loss, n = 0.0, 0
        for batch in batches:
            label = self.label(batch).cpu()
            for p, m in models.items():
                out = self.predict(m, batch["images"], tuple(label.shape[-2:])).cpu()
                metrics[p].update(out if seg else self.to_depth(out), label)
                if not p:
                    loss += float(self.loss({"out": out, "aux": None}, label)) * label.shape[0]
                    n += label.shape[0]
        result = {"loss": loss / max(n, 1)}
        for p, m in metrics.items():
            result.update({f"{p}{k}": float(v) for k, v in m.compute().items() if isinstance(v, float | int)})
        return result


class DenseTask(EncoderTask):
    """Segmentation (cross-entropy, ignore 255, + ``aux_weight`` x the auxiliary head's) or depth (masked MSE in
    metres or log-metres); evaluation at the labels' resolution, of the model and its EMA."""

    def __init__(self, cfg: FinetuneConfig, dataset: Any, *, verbose: bool = True) -> None:
        seed_everything(cfg.run.seed)
        self.cfg, self.kind = cfg, cfg.task
        if cfg.task == "segmentation" and not getattr(dataset, "has_seg", False):
            raise ValueError(f"dataset {cfg.data.name!r} has no segmentation labels")
        if cfg.task == "depth" and not getattr(dataset, "has_depth", False):
            raise ValueError(f"dataset {cfg.data.name!r} has no depth labels")
        self.evaluator, eval_size = DenseEvaluator.for_data(cfg, dataset)
        self.num_classes = self.evaluator.num_classes
        self.max_depth = float(getattr(dataset, "max_depth", 10.0))
        self.model = build_dense_model(cfg, dataset.channels, self.num_classes, self.max_depth)
        self.init_weights(verbose=verbose)
        self.set_augmentations(cfg.data, dataset.mean, dataset.std, dense=True, eval_size=eval_size)

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.train_mode()
        return {"loss": self.evaluator.loss(model(batch["images"]), self.evaluator.label(batch))}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        return self.evaluator.run(self.eval_models(model), batches)

    @torch.no_grad()
    def save_images(self, model: nn.Module, batch: dict[str, torch.Tensor], path: Path) -> None:
        """Rows: input, prediction, ground truth (class colours, or depth with near = bright), |error| for depth."""
        ev = self.evaluator
        label = ev.label(batch).cpu()
        out = ev.predict(model, batch["images"], tuple(label.shape[-2:])).cpu()
        shown = denormalize(batch["images"].float().cpu(), self.mean, self.std)
        if shown.shape[-2:] != label.shape[-2:]:
            shown = F.interpolate(shown, size=tuple(label.shape[-2:]), mode="bilinear", align_corners=False)
        if self.kind == "segmentation":
            rows = {
                "input": shown,
                "prediction": colorize_mask(out.argmax(dim=1), self.num_classes),
                "ground truth": colorize_mask(label, self.num_classes),
            }
        else:
            pred = ev.to_depth(out)
            err = torch.where(label > 0, (pred - label).abs() / self.max_depth, 0.0)
            rows = {
                "input": shown,
                "prediction": colorize_depth(pred, self.max_depth),
                "ground truth": colorize_depth(label, self.max_depth),
                "|error| / max depth": err[:, None].clamp(0, 1),
            }
        save_image_grid(rows, path, title=f"{path.stem}: {self.kind}")


def evaluate_dense(
    model: nn.Module, cfg: FinetuneConfig, dataset: Any, *, batch_size: int = 32, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Metrics of a dense ``model`` (from :func:`load_dense_model`) on ``dataset`` with the run's inference setting
    (``cfg.head.inference``) at the labels' resolution."""
    from torch.utils.data import DataLoader

    from mal.data import JointAugment, collate

    evaluator, size = DenseEvaluator.for_data(cfg, dataset)
    augment = JointAugment(size, train=False, mean=dataset.mean, std=dataset.std)
    model = model.to(device).eval()

    def batches():
        for raw in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
            if raw["images"] is None:
                continue
            images, depth, mask = augment(raw["images"].to(device), raw["depth"], raw["mask"])
            yield {"images": images, "depth": depth, "mask": mask}

    return evaluator.run({"": model}, batches())


def build_dense_model(
    cfg: FinetuneConfig, in_chans: int, out_channels: int, max_depth: float | None = None
) -> DensePredictor:
    """The model of a dense run; a depth head starts at ``max_depth / 2`` (its log with ``head.log_depth``)."""
    bias = None
    if cfg.task == "depth" and max_depth is not None:
        bias = depth_output_bias(max_depth / 2, log=cfg.head.log_depth)
    encoder = build_model(cfg, in_chans, 0, encoder_only=True)
    return DensePredictor(encoder, out_channels, cfg.head, out_bias=bias)


def load_dense_model(checkpoint: str | Path, *, ema: bool = False) -> tuple[DensePredictor, FinetuneConfig]:
    """The dense model of a ``task: segmentation|depth`` checkpoint (or run folder: its latest) and its config;
    ``ema=True`` loads the EMA weights."""
    ckpt, cfg, state = read_finetune_checkpoint(checkpoint)
    _, card = find_weights(ckpt)
    if card.get("kind") != "dense":
        raise ValueError(
            f"{ckpt} is not a dense checkpoint (its model is a {card.get('kind')}); load it with load_model"
        )
    model = DensePredictor.from_card(card)
    model.load_state_dict(state, strict=True)
    if ema:
        load_ema_weights(model, ckpt)
    return model.eval(), cfg
