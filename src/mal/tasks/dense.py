"""Dense prediction, shared by segmentation and depth (docs/DESIGN.md, 'Dense heads'): the encoder (``finetune``
mode) with its tokens put back on the patch grid and a dense head (:class:`DensePredictor`), whole-image or
sliding-window inference, the evaluator that fine-tuning and ``mal eval`` both use (with the per-volume DSC / HD95 of
:mod:`~mal.tasks.medical` on datasets of volumes), and the joint preparation of image, depth and mask batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mal.config import from_dict, to_dict
from mal.data import IGNORE_INDEX, VOLUME_TAGS, DataSettings, JointAugment, collate
from mal.models.base import WithEncoder
from mal.models.factory import model_from_card
from mal.models.heads import LinearDenseHead, UNetHead, UperNetHead, encoder_grid, pyramid_taps, unet_taps
from mal.tasks.depth import MIN_DEPTH, DepthMetrics, depth_loss
from mal.tasks.medical import VolumeMetrics
from mal.tasks.segmentation import SEG_LOSSES, SegmentationMetrics

TASKS = ("segmentation", "depth")


@dataclass
class DenseHeadSettings:
    """The head of ``task: segmentation | depth``. ``upernet``: UperNet on a feature pyramid from block
    pairs 4, 6, 8, 12 of 12 (scaled to the depth) rescaled to 4x/2x/1x/0.5x, with an auxiliary FCN head on the
    third level (segmentation only, loss weight ``aux_weight``); ``linear``: LayerNorm + a linear map per token to
    its patch's pixels (quick runs, and the multi-task pretraining heads); ``unet``: a U-Net decoder (UNETR /
    TransUNet style, :class:`~mal.models.heads.UNetHead`) over pairs 3, 6, 9, 12 of 12 brought to strides 16, 8, 4, 2
    (for 16 px patches; one tap per octave of the patch size) with a convolutional stem on the image as the
    full-resolution skip, for medical segmentation.

    ``loss`` (segmentation): ``ce`` cross-entropy, ``dice_ce`` Dice + cross-entropy (needs MONAI); None: ``dice_ce``
    for ``unet`` (the medical recipe of nnU-Net, TransUNet, UNETR), ``ce`` for the others.

    Where each choice comes from: docs/DESIGN.md, 'Dense heads'."""

    kind: Literal["linear", "upernet", "unet"] = "upernet"
    channels: int = 256  # UperNet width; U-Net: the width at the patch grid, halved at each finer level (min 16)
    dropout: float = 0.1
    aux_weight: float = 0.4
    log_depth: bool = False  # depth: regress log-depth (the loss is MSE in log space) instead of metres
    inference: Literal["whole", "slide"] = "whole"  # slide: windows of data.image_size over data.load_size images
    slide_stride: int | None = None  # slide: window stride in pixels (None: 2/3 of the window)
    loss: Literal["ce", "dice_ce"] | None = None  # segmentation loss; None: dice_ce for unet, ce for the others

    @property
    def seg_loss(self) -> str:
        """The segmentation loss's name in :data:`~mal.tasks.segmentation.SEG_LOSSES` (``loss`` resolved)."""
        return self.loss or ("dice_ce" if self.kind == "unet" else "ce")


class DensePredictor(WithEncoder):
    """ViL encoder (``finetune`` mode) + a dense head.

    ``forward(x (B, C, H, W)) -> {"out": (B, K, H, W), "aux": (B, K, H, W) or None}`` with ``K`` = classes
    (segmentation) or 1 (depth); ``aux`` only from UperNet in training mode. The U-Net head also reads ``x`` (its
    stem).
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
        elif head.kind == "unet":
            p = encoder.cfg.patch_size
            self.taps = unet_taps(pairs, p)
            self.head = UNetHead(
                dim, out_channels, patch_size=p, in_chans=encoder.cfg.in_chans, channels=head.channels,
                dropout=head.dropout,
            )  # fmt: skip
        else:
            self.taps = pyramid_taps(pairs)
            self.head = UperNetHead(dim, out_channels, channels=head.channels, dropout=head.dropout)
        self.kind = head.kind
        if out_bias is not None:
            with torch.no_grad():
                (self.head.proj if head.kind == "linear" else self.head.classifier).bias.fill_(out_bias)

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
        if self.kind == "unet":
            return self.head(feats, x)
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


class DenseEvaluator:
    """Loss, inference and metrics of one dense task, shared by training (:class:`DenseTask`) and ``mal eval``.

    ``kind``: ``segmentation`` or ``depth``; ``window``: sliding-window size (None: whole image); ``classes``: the
    class names (the keys of per-class volume metrics).
    """

    def __init__(
        self, kind: str, head: DenseHeadSettings, num_classes: int, *, window: int | None = None,
        label_smoothing: float = 0.0, classes: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        if kind not in TASKS:
            raise ValueError(f"unknown dense task {kind!r}; valid: {', '.join(TASKS)}")
        self.kind, self.head, self.label_smoothing = kind, head, label_smoothing
        self.num_classes, self.window = num_classes, window
        self.classes = tuple(classes) if classes is not None and len(classes) == num_classes else None
        self.seg_loss = SEG_LOSSES[head.seg_loss]

    @classmethod
    def for_data(
        cls, kind: str, head: DenseHeadSettings, data: DataSettings, dataset: Any, *, label_smoothing: float = 0.0
    ) -> tuple[DenseEvaluator, int | tuple[int, int]]:
        """The evaluator of a run on ``dataset`` and the size its eval images are resized to: ``data.image_size``
        (whole-image inference) or the full ``data.load_size`` (sliding ``data.image_size`` windows)."""
        slide = head.inference == "slide"
        num_classes = dataset.num_classes if kind == "segmentation" else 1
        evaluator = cls(
            kind, head, num_classes, window=data.image_size if slide else None, label_smoothing=label_smoothing,
            classes=getattr(dataset, "classes", None),
        )  # fmt: skip
        return evaluator, (data.load_size or dataset.load_size) if slide else data.image_size

    def loss(self, out: dict[str, torch.Tensor | None], label: torch.Tensor) -> torch.Tensor:
        """``label``: the mask ``(B, H, W)`` (segmentation) or the depth map ``(B, H, W)``."""
        if self.kind == "segmentation":
            ls, seg_loss = self.label_smoothing, self.seg_loss
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
        (prepared with the eval transform: labels at their own resolution).

        Segmentation batches tagged with :data:`VOLUME_TAGS` (datasets of volumes, in dataset order) add the volume
        metrics of :class:`~mal.tasks.medical.VolumeMetrics`: ``dsc`` (percent), ``hd95`` (mm, or voxels when the
        dataset does not know its spacing) and ``dsc_<class>`` / ``hd95_<class>`` per foreground class."""
        seg = self.kind == "segmentation"
        metrics = {
            p: SegmentationMetrics(self.num_classes, ignore_index=IGNORE_INDEX)
            if seg
            else DepthMetrics(min_depth=MIN_DEPTH)
            for p in models
        }
        volumes: dict[str, VolumeMetrics] = {}
        loss, n = 0.0, 0
        for batch in batches:
            label = self.label(batch).cpu()
            tagged = seg and batch.get("volume") is not None
            for p, m in models.items():
                out = self.predict(m, batch["images"], tuple(label.shape[-2:])).cpu()
                metrics[p].update(out if seg else self.to_depth(out), label)
                if tagged:
                    if p not in volumes:
                        volumes[p] = VolumeMetrics(self.num_classes, self.classes, ignore_index=IGNORE_INDEX)
                    tags = (batch[k].cpu() for k in VOLUME_TAGS)
                    volumes[p].update_slices(out.argmax(dim=1), label, *tags)
                if not p:
                    loss += float(self.loss({"out": out, "aux": None}, label)) * label.shape[0]
                    n += label.shape[0]
        result = {"loss": loss / max(n, 1)}
        for p, m in metrics.items():
            result.update({f"{p}{k}": _rounded(k, v) for k, v in m.compute().items() if isinstance(v, float | int)})
            if p in volumes:
                result.update({f"{p}{k}": _rounded(k, v) for k, v in volumes[p].flat().items()})
        return result


def _rounded(name: str, value: float) -> float:
    """Percentages (mIoU, pixel accuracy, delta<1.25, DSC) and distances (HD95) to two decimals, errors (RMSE,
    AbsRel) to four."""
    return round(float(value), 4 if name in ("rmse", "abs_rel") else 2)


def evaluate_dense(
    model: nn.Module, kind: str, head: DenseHeadSettings, data: DataSettings, dataset: Any, *, batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> dict[str, float]:  # fmt: skip
    """Metrics of a dense ``model`` on ``dataset`` with a run's inference setting (``head.inference``, the sizes of
    ``data``) at the labels' resolution: what the run's own evaluation computes."""
    from torch.utils.data import DataLoader

    evaluator, size = DenseEvaluator.for_data(kind, head, data, dataset)
    augment = JointAugment(size, train=False, mean=dataset.mean, std=dataset.std)
    model = model.to(device).eval()
    device = torch.device(device)

    def batches():
        for raw in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
            if raw["images"] is not None:
                yield prepare_dense(augment, raw, device)

    return evaluator.run({"": model}, batches())


def prepare_dense(augment: JointAugment, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated dense batch -> ``{"images": normalized float (B, C, S, S), "depth": (B, h, w), "mask": (B, h, w)}``:
    one joint crop and flip in training; in evaluation the labels keep their resolution and the volume tags
    (:data:`VOLUME_TAGS`, when the dataset has them) come along on the CPU."""
    images = batch["images"].to(device, non_blocking=True)
    depth, mask = (
        batch[k].to(device, non_blocking=True) if batch.get(k) is not None else None for k in ("depth", "mask")
    )
    images, depth, mask = augment(images, depth, mask)
    out = {"images": images, "depth": depth, "mask": mask}
    if not augment.random and batch.get("volume") is not None:
        out |= {k: batch[k] for k in VOLUME_TAGS}
    return out
