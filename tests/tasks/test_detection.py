"""Detection and instance segmentation: the COCO metrics (a perfect prediction scores AP 100), the detector on a
ViL backbone (learns one batch, layer decay by encoder layer, saved and loaded as itself), batches and flips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mal
from mal.engine.optim import param_groups
from mal.models import create_encoder
from mal.tasks.detection import CocoEvaluator, DetectionSettings, Detector, prepare_detection

SMALL = {"dim": 32, "depth": 2, "num_heads": 2}
TINY_DET = DetectionSettings(
    min_size=[64], max_size=96, anchor_sizes=[8, 16, 32, 64, 128], fpn_channels=32, box_head_width=64,
    mask_head_width=32, rpn_batch=64, roi_batch=64, rpn_pre_nms=200, rpn_post_nms=100,
)  # fmt: skip


def boxes_and_masks(h: int = 48, w: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two objects: a rectangle (label 1) and a disc (label 2); boxes xyxy, labels, masks uint8 (2, H, W)."""
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 5:20, 8:30] = 1
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks[1] = ((yy - 32) ** 2 + (xx - 45) ** 2 <= 81).to(torch.uint8)
    boxes = torch.stack([mask_box(m) for m in masks])
    return boxes, torch.tensor([1, 2]), masks


def mask_box(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def coco_gt(boxes: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, cat_ids: list[int]):  # noqa: ANN201
    """A pycocotools ``COCO`` of one image (id 7) with these instances, categories ``cat_ids``."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    anns = []
    for i, (b, k, m) in enumerate(zip(boxes.tolist(), labels.tolist(), masks, strict=True)):
        rle = mask_utils.encode(np.asfortranarray(m.numpy()))
        anns.append({"id": i + 1, "image_id": 7, "category_id": cat_ids[k - 1], "iscrowd": 0,
                     "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": float(m.sum()),
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})  # fmt: skip
    coco = COCO()
    coco.dataset = {"images": [{"id": 7, "height": masks.shape[1], "width": masks.shape[2]}], "annotations": anns,
                    "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids]}  # fmt: skip
    coco.createIndex()
    return coco


def test_a_perfect_prediction_scores_ap_100_and_worse_ones_less():
    boxes, labels, masks = boxes_and_masks()
    cat_ids = [3, 90]  # COCO ids are not 1..K: labels map back through cat_ids
    gt = coco_gt(boxes, labels, masks, cat_ids)
    perfect = {"boxes": boxes, "labels": labels, "scores": torch.ones(2), "masks": masks[:, None].float()}
    ev = CocoEvaluator(gt, cat_ids)
    ev.add([perfect], [{"image_id": 7}])
    res = ev.summarize()
    assert res["ap_box"] == pytest.approx(100.0) and res["ap_mask"] == pytest.approx(100.0)
    assert res["ap50_box"] == pytest.approx(100.0) and math.isnan(res["apl_box"])  # no large objects: undefined
    shifted = dict(perfect, boxes=boxes + torch.tensor([6.0, 0.0, 6.0, 0.0]), masks=masks.roll(6, -1)[:, None].float())
    ev = CocoEvaluator(gt, cat_ids)
    ev.add([shifted], [{"image_id": 7}])
    worse = ev.summarize()
    assert 0 < worse["ap_box"] < 100 and 0 < worse["ap_mask"] < 100
    swapped = dict(perfect, labels=labels.flip(0))  # right places, wrong classes
    ev = CocoEvaluator(gt, cat_ids)
    ev.add([swapped], [{"image_id": 7}])
    assert ev.summarize()["ap_box"] == 0.0
    empty = CocoEvaluator(gt, cat_ids)
    empty.add([{k: v[:0] for k, v in perfect.items()}], [{"image_id": 7}])
    assert empty.summarize() == {f"{s}_{k}": 0.0 for k in ("box", "mask") for s in
                                 ("ap", "ap50", "ap75", "aps", "apm", "apl")}  # fmt: skip


def test_detections_on_scaled_images_are_scored_at_the_files_size():
    boxes, labels, masks = boxes_and_masks()  # the ground truth at 48 x 64
    gt = coco_gt(boxes, labels, masks, [1, 2])
    half = torch.nn.functional.interpolate(masks[:, None].float(), size=(24, 32), mode="bilinear")
    ev = CocoEvaluator(gt, [1, 2])
    ev.add([{"boxes": boxes / 2, "labels": labels, "scores": torch.ones(2), "masks": half}], [{"image_id": 7}],
           sizes=[(24, 32)])  # fmt: skip
    res = ev.summarize()
    assert res["ap_box"] == pytest.approx(100.0) and res["ap50_mask"] == pytest.approx(100.0)


def test_a_flip_moves_boxes_with_their_masks():
    boxes, labels, masks = boxes_and_masks()
    batch = {"images": [torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8)],
             "targets": [{"boxes": boxes, "labels": labels, "masks": masks, "image_id": 7}]}  # fmt: skip
    torch.manual_seed(1)
    flips = [bool(torch.rand(()) < 0.5) for _ in range(6)]
    torch.manual_seed(1)
    for flipped in flips:
        out = prepare_detection(batch, torch.device("cpu"), flip=True)
        img, tgt = out["images"][0], out["targets"][0]
        assert img.dtype == torch.float32 and img.min() >= 0 and img.max() <= 1
        expect = batch["images"][0].flip(-1) if flipped else batch["images"][0]
        torch.testing.assert_close(img, expect.float() / 255)
        for b, m in zip(tgt["boxes"], tgt["masks"], strict=True):
            torch.testing.assert_close(b, mask_box(m))  # the box is still its mask's box
    assert any(flips) and not all(flips)


def _detector(num_classes: int = 2) -> Detector:
    torch.manual_seed(0)
    return Detector(create_encoder("mal_micro", image_size=64, **SMALL), num_classes, TINY_DET, mean=(0.5,) * 3,
                    std=(0.25,) * 3, classes=["box", "disc"])  # fmt: skip


def test_the_detector_learns_one_batch_and_decays_the_encoder_by_layer():
    boxes, labels, masks = boxes_and_masks()
    torch.manual_seed(0)
    image = torch.rand(3, 48, 64) * 0.2
    image[:, masks.bool().any(0)] += 0.7  # the objects stand out
    det = _detector().train()
    groups = param_groups(det, 0.05, layer_decay=0.5)
    scales = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scales["detector.backbone.encoder.patch_embed.proj.weight"] == 0.5**3
    assert scales["detector.backbone.encoder.blocks.1.fwd.norm.weight"] == 0.5
    assert scales["detector.roi_heads.box_head.fc6.weight"] == scales["detector.backbone.neck.levels.0.1.weight"] == 1
    assert "detector.backbone.encoder.pos_embed.embed" in det.no_weight_decay()
    opt = torch.optim.AdamW(det.parameters(), lr=2e-3)
    target = [{"boxes": boxes, "labels": labels, "masks": masks}]
    first = None
    for _ in range(30):
        losses = det([image], target)
        loss = sum(losses.values())
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first, (first, float(loss.detach()))


def test_a_saved_detector_loads_as_itself(tmp_path):
    det = _detector().eval()
    folder = mal.save_model(det, tmp_path / "det")
    again = mal.load_model(folder)
    assert isinstance(again, Detector) and again.classes == ["box", "disc"] and again.settings == TINY_DET
    image = [torch.rand(3, 40, 56)]
    with torch.no_grad():
        a, b = det(image)[0], again(image)[0]
    assert a.keys() == b.keys() == {"boxes", "labels", "scores", "masks"}
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_faster_rcnn_has_no_mask_branch():
    settings = DetectionSettings(**{**TINY_DET.__dict__, "detector": "faster_rcnn"})
    det = Detector(create_encoder("mal_micro", **SMALL), 3, settings, mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    with torch.no_grad():
        out = det([torch.rand(3, 32, 32)])[0]
    assert "masks" not in out and not det.has_masks
    with pytest.raises(ValueError, match="anchor_sizes"):
        DetectionSettings(anchor_sizes=[8, 16]).validate()
