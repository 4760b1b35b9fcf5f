"""Object detection and instance segmentation (MAL-v2 Tables 3 and 9): torchvision's Mask R-CNN or Faster R-CNN on
a plain encoder through ViTDet's simple feature pyramid (:class:`~mal.models.features.PyramidBackbone`), the COCO
metrics (pycocotools' ``COCOeval``, the numbers papers report), the evaluator that fine-tuning and ``mal eval``
share, and a picture of predictions.

The detector is torchvision's, whole: its resizing and normalization (``GeneralizedRCNNTransform``: the shorter side
to a size drawn from ``min_size`` in training, the last one in evaluation, the longer side at most ``max_size``,
padding to a multiple of 32), anchors, RPN, RoIAlign heads and losses. This module builds it on our backbone and
wraps it (:class:`Detector`) so that the engine sees an encoder to decay by layer and a model to save and load.
torchvision and pycocotools are the ``mal-vision[detection]`` extra, imported when a detector is built.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from mal.config import from_dict, to_dict
from mal.data.common import unit_float
from mal.models.base import encoder_layer
from mal.models.factory import model_from_card
from mal.models.features import PyramidBackbone

DETECTORS = ("mask_rcnn", "faster_rcnn")
#: the COCO summary's 12 numbers that papers report, in COCOeval.stats order (the first six)
COCO_STATS = ("ap", "ap50", "ap75", "aps", "apm", "apl")
_PREFIX = "detector.backbone.encoder."  # where the encoder's parameters live inside the detector


@dataclass
class DetectionSettings:
    """The detector of ``task: detection``. ``min_size``: the shorter side in pixels, one drawn per batch in
    training (scale jitter; torchvision's multi-scale training), the last one in evaluation; ``max_size``: the
    longer side's cap. ``anchor_sizes``: one anchor size per pyramid level (strides 4, 8, 16, 32, 64), in pixels of
    the resized image. ``box_head_width`` / ``mask_head_width``: the RoI heads' widths (torchvision's 1024 and 256);
    ``rpn_batch`` / ``roi_batch``: sampled anchors and proposals per image; ``detections``: kept per image in
    evaluation, above ``score_thresh``."""

    detector: Literal["mask_rcnn", "faster_rcnn"] = "mask_rcnn"
    fpn_channels: int = 256
    min_size: list[int] = field(default_factory=lambda: [800])
    max_size: int = 1333
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    box_head_width: int = 1024
    mask_head_width: int = 256
    rpn_batch: int = 256
    roi_batch: int = 512
    rpn_pre_nms: int = 2000  # proposals before NMS per level in training (half of it in evaluation)
    rpn_post_nms: int = 1000  # proposals kept after NMS per image in training (and in evaluation)
    detections: int = 100
    score_thresh: float = 0.05

    def validate(self) -> None:
        if not self.min_size or min(self.min_size) < 1 or self.max_size < max(self.min_size):
            raise ValueError(f"min_size must be positive sizes up to max_size, got {self.min_size} / {self.max_size}")
        if len(self.anchor_sizes) != 5 or min(self.anchor_sizes) < 1:
            raise ValueError(f"anchor_sizes: one positive size per level (5: strides 4..64), got {self.anchor_sizes}")
        for name in ("fpn_channels", "box_head_width", "mask_head_width", "rpn_batch", "roi_batch", "rpn_pre_nms",
                     "rpn_post_nms", "detections"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.score_thresh < 1:
            raise ValueError(f"score_thresh must be in [0, 1), got {self.score_thresh}")


def _torchvision() -> Any:
    try:
        import torchvision  # noqa: F401
        from torchvision.models import detection
    except (ImportError, RuntimeError) as e:  # RuntimeError: a torchvision built for another torch
        raise ImportError(
            f"detection needs torchvision built for the installed torch ({e}); install the pair the Makefile names "
            '(TORCH_PAIR) and pip install "mal-vision[detection]"'
        ) from e
    return detection


class Detector(nn.Module):
    """A torchvision detector (``self.detector``) on an encoder: ``forward(images, targets=None)`` as torchvision's,
    ``images`` a list of ``(C, H, W)`` float tensors in [0, 1] of any sizes; in training ``targets`` (per image
    ``boxes`` float ``(N, 4)`` xyxy pixels, ``labels`` int64 ``(N,)`` in 1..K, ``masks`` uint8 ``(N, H, W)``) and the
    return is the dict of losses; in evaluation per image ``{"boxes", "labels", "scores", "masks" (N, 1, H, W)
    probabilities}``. ``encoder``, ``num_layers``, ``layer_of`` and ``no_weight_decay`` serve layer-wise lr decay
    (the pyramid and the heads are the last layer)."""

    def __init__(
        self, encoder: nn.Module, num_classes: int, settings: DetectionSettings, *, mean: Sequence[float],
        std: Sequence[float], classes: Sequence[str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        det = _torchvision()
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
        from torchvision.models.detection.rpn import AnchorGenerator
        from torchvision.ops import MultiScaleRoIAlign

        s = settings
        self.settings, self.num_classes = s, int(num_classes)
        self.classes = list(classes) if classes is not None else [str(i) for i in range(1, num_classes + 1)]
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(v) for v in std)
        backbone = PyramidBackbone(encoder, out_channels=s.fpn_channels)
        levels = ["0", "1", "2", "3"]
        c = s.fpn_channels
        kw: dict[str, Any] = dict(
            min_size=tuple(s.min_size), max_size=s.max_size, image_mean=list(self.mean), image_std=list(self.std),
            rpn_anchor_generator=AnchorGenerator(tuple((a,) for a in s.anchor_sizes), ((0.5, 1.0, 2.0),) * 5),
            rpn_pre_nms_top_n_train=s.rpn_pre_nms, rpn_pre_nms_top_n_test=max(1, s.rpn_pre_nms // 2),
            rpn_post_nms_top_n_train=s.rpn_post_nms, rpn_post_nms_top_n_test=s.rpn_post_nms,
            rpn_batch_size_per_image=s.rpn_batch, box_batch_size_per_image=s.roi_batch,
            box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(c * 7 * 7, s.box_head_width),
            box_predictor=FastRCNNPredictor(s.box_head_width, num_classes + 1),
            box_detections_per_img=s.detections, box_score_thresh=s.score_thresh,
        )  # fmt: skip
        if s.detector == "mask_rcnn":
            w = s.mask_head_width
            kw |= dict(
                mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
                mask_head=MaskRCNNHeads(c, (w, w, w, w), 1), mask_predictor=MaskRCNNPredictor(w, w, num_classes + 1),
            )  # fmt: skip
            self.detector = det.MaskRCNN(backbone, **kw)
        else:
            self.detector = det.FasterRCNN(backbone, **kw)

    @property
    def encoder(self) -> nn.Module:
        return self.detector.backbone.encoder

    @property
    def has_masks(self) -> bool:
        return self.settings.detector == "mask_rcnn"

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    def layer_of(self, name: str) -> int:
        """Layer of a parameter for layer-wise lr decay: the encoder's by its layers, everything else last."""
        return encoder_layer(name, self.num_layers, prefix=_PREFIX)

    def no_weight_decay(self) -> set[str]:
        return {f"{_PREFIX}{n}" for n in self.encoder.no_weight_decay()}

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        return self.detector(images, targets)

    def mal_card(self) -> dict[str, Any]:
        """The description saved with the weights: the encoder's, ``kind: detector``, the detector's settings."""
        info = {"settings": to_dict(self.settings), "num_classes": self.num_classes, "classes": self.classes,
                "mean": list(self.mean), "std": list(self.std)}  # fmt: skip
        return {**self.encoder.mal_card(), "kind": "detector", "detection": info}

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> Detector:
        """The detector a ``kind: detector`` description names, with fresh weights."""
        info = card.get("detection") or {}
        settings = from_dict(DetectionSettings, info.get("settings", {}), where="model description detection")
        return cls(
            model_from_card(card, encoder_only=True), int(info["num_classes"]), settings, mean=info["mean"],
            std=info["std"], classes=info.get("classes"),
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------------- batches


def prepare_detection(batch: dict[str, Any], device: torch.device, *, flip: bool = False) -> dict[str, list[Any]]:
    """A collated detection batch (lists of uint8 or float ``(C, H, W)`` images and their targets) -> images as float
    in [0, 1] and targets on ``device``; ``flip``: each image flipped horizontally with probability 0.5 (boxes and
    masks with it), drawn from torch's global RNG (reseeded every step by the engine)."""
    images, targets = [], []
    for img, tgt in zip(batch["images"], batch["targets"], strict=True):
        x = unit_float(img.to(device, non_blocking=True))
        t = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in tgt.items()}
        if flip and bool(torch.rand(()) < 0.5):
            w = x.shape[-1]
            x = x.flip(-1)
            if "boxes" in t and len(t["boxes"]):
                b = t["boxes"].clone()
                b[:, 0], b[:, 2] = w - t["boxes"][:, 2], w - t["boxes"][:, 0]
                t["boxes"] = b
            if "masks" in t:
                t["masks"] = t["masks"].flip(-1)
        images.append(x)
        targets.append(t)
    return {"images": images, "targets": targets}


def iter_batches(dataset: Any, batch_size: int, device: str | torch.device = "cpu") -> Iterable[dict[str, list]]:
    """Prepared evaluation batches of a detection dataset, in order (unreadable images dropped)."""
    from torch.utils.data import DataLoader

    from mal.data import collate

    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        if batch["images"] is not None:
            yield prepare_detection(batch, torch.device(device))


# ----------------------------------------------------------------------------------------------------- COCO metrics


class CocoEvaluator:
    """Accumulates detections of a split and scores them with pycocotools' ``COCOeval`` against ``coco_gt`` (the
    dataset's ground truth, crowd regions included), for boxes and, with ``masks``, instance masks.
    ``cat_ids[k - 1]`` is the COCO category id of label ``k``. :meth:`summarize` gives AP, AP50, AP75, AP_s, AP_m,
    AP_l in percent as ``{"ap_box", ..., "ap_mask", ...}`` (0 when there is no detection at all, NaN for a size range
    without ground truth)."""

    def __init__(self, coco_gt: Any, cat_ids: Sequence[int], *, masks: bool = True) -> None:
        self.coco_gt, self.cat_ids, self.masks = coco_gt, list(cat_ids), masks
        self.results: list[dict[str, Any]] = []
        self.image_ids: set[int] = set()

    def add(
        self, outputs: list[dict[str, torch.Tensor]], targets: list[dict[str, Any]],
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> None:  # fmt: skip
        """One batch: torchvision's detections, the targets they belong to (their ``image_id``) and the ``(H, W)``
        of the images they were made on (default: the masks'). A dataset that scaled its images (``load_size``)
        keeps its ground truth at the files' sizes: detections are scaled back to those before scoring."""
        from pycocotools import mask as mask_utils

        for i, (out, tgt) in enumerate(zip(outputs, targets, strict=True)):
            image_id = int(tgt["image_id"])
            self.image_ids.add(image_id)
            boxes = out["boxes"].detach().float().cpu()
            if not len(boxes):
                continue
            info = self.coco_gt.imgs[image_id]
            full = (int(info["height"]), int(info["width"]))
            size = tuple(sizes[i]) if sizes is not None else tuple(out["masks"].shape[-2:]) if "masks" in out else full
            if size != full:
                boxes = boxes * torch.tensor([full[1] / size[1], full[0] / size[0]] * 2)
            boxes = boxes.numpy()
            scores = out["scores"].detach().float().cpu().tolist()
            labels = out["labels"].detach().cpu().tolist()
            rles: list[Any] = [None] * len(boxes)
            if self.masks and "masks" in out:
                soft = out["masks"][:, :1].detach().float().cpu()  # (N, 1, h, w) probabilities
                if tuple(soft.shape[-2:]) != full:
                    soft = torch.nn.functional.interpolate(soft, size=full, mode="bilinear", align_corners=False)
                binary = (soft[:, 0] > 0.5).numpy().astype(np.uint8)  # (N, H, W)
                rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
            for (x1, y1, x2, y2), score, label, rle in zip(boxes.tolist(), scores, labels, rles, strict=True):
                row = {"image_id": image_id, "category_id": self.cat_ids[label - 1], "score": score,
                       "bbox": [x1, y1, x2 - x1, y2 - y1]}  # fmt: skip
                if rle is not None:
                    row["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
                self.results.append(row)

    def summarize(self) -> dict[str, float]:
        from pycocotools.cocoeval import COCOeval

        kinds = ["bbox", "segm"] if self.masks else ["bbox"]
        out: dict[str, float] = {}
        for kind in kinds:
            suffix = "box" if kind == "bbox" else "mask"
            rows = [r for r in self.results if kind == "bbox" or "segmentation" in r]
            if not rows:  # COCO's loadRes cannot take an empty list: nothing detected scores 0
                out |= {f"{name}_{suffix}": 0.0 for name in COCO_STATS}
                continue
            with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its progress and table
                dt = self.coco_gt.loadRes([{k: v for k, v in r.items() if kind == "segm" or k != "segmentation"}
                                           for r in rows])  # fmt: skip
                ev = COCOeval(self.coco_gt, dt, kind)
                ev.params.imgIds = sorted(self.image_ids)
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            stats = zip(COCO_STATS, ev.stats[:6], strict=True)
            # COCOeval's -1: no ground truth of that kind (e.g. no small objects): undefined, not zero
            out |= {f"{name}_{suffix}": 100.0 * float(v) if v >= 0 else float("nan") for name, v in stats}
        return out


@torch.no_grad()
def evaluate_detector(
    models: dict[str, nn.Module], batches: Iterable[dict[str, Any]], coco_gt: Any, cat_ids: Sequence[int]
) -> dict[str, float]:
    """COCO metrics of each model of ``models`` (by metric prefix, e.g. ``{"": model, "ema_": ema}``) over prepared
    ``batches`` (:func:`prepare_detection`)."""
    evaluators = {p: CocoEvaluator(coco_gt, cat_ids, masks=_has_masks(m)) for p, m in models.items()}
    modes = {p: m.training for p, m in models.items()}
    for m in models.values():
        m.eval()
    for batch in batches:
        sizes = [tuple(img.shape[-2:]) for img in batch["images"]]
        for prefix, model in models.items():
            evaluators[prefix].add(model(batch["images"]), batch["targets"], sizes)
    for p, m in models.items():
        m.train(modes[p])
    return {f"{p}{k}": v for p, ev in evaluators.items() for k, v in ev.summarize().items()}


def _has_masks(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # an EMA (AveragedModel) or DDP wraps the detector
    return bool(getattr(inner, "has_masks", True))


# ---------------------------------------------------------------------------------------------------------- picture


def draw_detections(
    images: list[torch.Tensor], outputs: list[dict[str, torch.Tensor]], classes: Sequence[str], *,
    score: float = 0.5, size: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Detections over their images: ``(B, 3, S, S)`` float in [0, 1], each image's boxes with class and score and
    its masks (above ``score``) drawn by torchvision, then padded to the largest side (``size``)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    side = size or max(max(img.shape[-2:]) for img in images)
    drawn = []
    for img, out in zip(images, outputs, strict=True):
        x = (unit_float(img.cpu()).clamp(0, 1) * 255).round().to(torch.uint8)
        x = x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3]
        keep = out["scores"].cpu() >= score if "scores" in out else torch.ones(len(out["boxes"]), dtype=torch.bool)
        if "masks" in out and keep.any():
            masks = out["masks"].cpu()[keep]
            masks = masks[:, 0] > 0.5 if masks.dim() == 4 else masks.bool()
            x = draw_segmentation_masks(x, masks, alpha=0.45)
        if keep.any():
            labels = out["labels"].cpu()[keep].tolist()
            scores = out["scores"].cpu()[keep].tolist() if "scores" in out else [None] * len(labels)
            names = [classes[k - 1] + ("" if s is None else f" {s:.2f}") for k, s in zip(labels, scores, strict=True)]
            x = draw_bounding_boxes(x, out["boxes"].cpu()[keep].float(), labels=names, width=1)
        canvas = torch.zeros(3, side, side, dtype=torch.uint8)
        h, w = min(side, x.shape[1]), min(side, x.shape[2])
        canvas[:, :h, :w] = x[:, :h, :w]
        drawn.append(canvas.float() / 255)
    return torch.stack(drawn)


@torch.no_grad()
def picture_rows(model: nn.Module, batch: dict[str, list], classes: Sequence[str]) -> dict[str, torch.Tensor]:
    """The rows of a predictions picture of a prepared ``batch``: ``{"prediction": ..., "ground truth": ...}``, each
    ``(B, 3, S, S)`` (:func:`draw_detections`; predictions of score 0.5 or more)."""
    was = model.training
    model.eval()
    outputs = model(batch["images"])
    model.train(was)
    return {
        "prediction": draw_detections(batch["images"], outputs, classes),
        "ground truth": draw_detections(batch["images"], batch["targets"], classes),
    }


__all__ = [
    "COCO_STATS",
    "DETECTORS",
    "CocoEvaluator",
    "DetectionSettings",
    "Detector",
    "draw_detections",
    "evaluate_detector",
    "iter_batches",
    "picture_rows",
    "prepare_detection",
]
