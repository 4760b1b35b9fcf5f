"""COCO instances (detection and instance segmentation): the reader of COCO's on-disk format (:class:`CocoDetection`),
the base of every detection dataset (:class:`DetectionDataset`) and the writer of that format (:func:`write_coco`).

A detection dataset yields ``(image, target)``: ``image`` ``(3, H, W)`` as :func:`~mal.data.common.read_image` gives
it (uint8 for 8-bit files) at the sample's own size (sizes differ within a dataset), and ``target = {"boxes":
float32 (N, 4) xyxy in pixels, "labels": int64 (N,) in 1..K (0 is the detector's background), "masks": uint8 (N, H,
W) 0/1, "image_id": int}``; ``"masks"`` is left out when the dataset has none (``has_masks`` false: box-only
annotations). An unreadable image file gives ``(None, None)`` after a warn-once :class:`BadImageWarning`, which
:func:`mal.data.collate` drops and counts. The dataset's ``coco`` (a ``pycocotools.coco.COCO``) is the split's ground
truth, crowd regions included, in the coordinates of ``orig_sizes``: evaluate with ``COCOeval(coco, results)`` and
``params.imgIds = image_ids``, a prediction's label ``k`` being COCO category ``cat_ids[k - 1]``.

pycocotools (``pip install "mal-vision[detection]"``) decodes masks and holds the ground truth; it is imported on
first use.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mal.data.common import (
    _DECODE_ERRORS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    UnsupportedImageError,
    _nearest_indices,
    decode_image,
    image_size,
    image_tensor,
    random_subset,
    resize_image,
    warn_bad_file,
)
from mal.io import atomic_write

COCO_SPLITS = ("train", "val")

DetectionTarget = dict[str, Any]


def _pycocotools() -> tuple[Any, Any]:
    """``(pycocotools.coco.COCO, pycocotools.mask)``, an optional dependency."""
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
    except ImportError:
        raise ImportError('COCO data needs pycocotools: pip install "mal-vision[detection]"') from None
    return COCO, mask_utils


def coco_from_dict(dataset: dict[str, Any]) -> Any:
    """A ``pycocotools.coco.COCO`` over ``dataset`` (the parsed JSON of an instances file), indexed without
    pycocotools' prints."""
    coco_cls, _ = _pycocotools()
    coco = coco_cls()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class AnnotationWarning(UserWarning):
    """Boxes of an annotation file that were clipped to their image or skipped (zero area after clipping, negative
    width or height); warned once per dataset with the counts."""


class DetectionDataset(Dataset):
    """Base of the detection datasets: the shared attributes (see the module's docstring), ``len`` and the warn-once
    handling of unreadable files.

    ``orig_sizes[i]`` is the ``(H, W)`` of sample ``i``'s image in ``coco``; a sample is smaller when ``load_size``
    scaled it, and predictions on it go back to ``orig_sizes[i]`` (boxes scaled by ``W / w`` and ``H / h``, masks
    resized) before they are compared with ``coco``.
    """

    detection = True
    classes: tuple[str, ...]
    num_classes: int
    channels: int = 3
    mean: tuple[float, ...]
    std: tuple[float, ...]
    load_size: int | None
    has_masks: bool
    image_ids: list[int]
    cat_ids: list[int]
    orig_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.image_ids)

    def _bad(self, key: str, message: str, err: BaseException) -> tuple[None, None]:
        warn_bad_file(self.__dict__.setdefault("_warned", set()), key, message, err, stacklevel=4)  # via _bad
        return None, None


def check_load_size(load_size: Any) -> int | None:
    """``load_size`` of a detection dataset: None or one positive int (the longer side)."""
    if load_size is None:
        return None
    if isinstance(load_size, bool) or not isinstance(load_size, int | np.integer) or load_size < 1:
        raise ValueError(f"load_size of a detection dataset is one positive int (the longer side), got {load_size!r}")
    return int(load_size)


def scaled_size(h: int, w: int, load_size: int | None) -> tuple[int, int]:
    """``(h, w)`` scaled so the longer side is at most ``load_size`` (never enlarged; each side at least 1)."""
    if load_size is None or max(h, w) <= load_size:
        return h, w
    s = load_size / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


# ----------------------------------------------------------------------------------------------------------- reader


def _read_json(path: Path) -> dict[str, Any]:
    """The parsed instances file, its top level checked: ``images``, ``annotations`` and ``categories`` lists."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    keys = ("images", "annotations", "categories")
    missing = [k for k in keys if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{path}: not a COCO instances file (no list {', '.join(repr(k) for k in missing)})")
    return data


def _check_records(path: Path, data: dict[str, Any]) -> None:
    """Every image, category and annotation has the fields this reader uses, with ids that resolve; ``iscrowd``
    defaults to 0 and a missing ``area`` is computed (``COCOeval`` reads both)."""

    def need(kind: str, rec: Any, fields: tuple[str, ...]) -> None:
        lacking = [f for f in fields if not isinstance(rec, dict) or f not in rec]
        if lacking:
            who = f" id {rec['id']}" if isinstance(rec, dict) and "id" in rec else ""
            raise ValueError(f"{path}: {kind}{who} has no {', '.join(repr(f) for f in lacking)}")

    for img in data["images"]:
        need("image", img, ("id", "file_name", "height", "width"))
    for cat in data["categories"]:
        need("category", cat, ("id", "name"))
    images = {img["id"]: img for img in data["images"]}
    cats = {c["id"] for c in data["categories"]}
    if len(images) < len(data["images"]) or len(cats) < len(data["categories"]):
        raise ValueError(f"{path}: duplicate image or category ids")
    ann_ids: set[Any] = set()
    for ann in data["annotations"]:
        need("annotation", ann, ("id", "image_id", "category_id", "bbox"))
        where = f"{path}: annotation {ann['id']}"
        if ann["id"] in ann_ids:
            raise ValueError(f"{where} appears twice")
        ann_ids.add(ann["id"])
        if ann["image_id"] not in images:
            raise ValueError(f"{where} refers to image {ann['image_id']}, which the file does not list")
        if ann["category_id"] not in cats:
            raise ValueError(f"{where} has category {ann['category_id']}, which the file does not list")
        box = ann["bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, int | float) for v in box):
            raise ValueError(f"{where}: bbox must be [x, y, width, height], got {box!r}")
        segm = ann.setdefault("segmentation", [])
        img = images[ann["image_id"]]
        if isinstance(segm, dict):
            if "counts" not in segm or list(segm.get("size", ())) != [img["height"], img["width"]]:
                raise ValueError(
                    f"{where}: an RLE segmentation needs 'counts' and 'size' [{img['height']}, {img['width']}] "
                    f"(its image's), got size {segm.get('size')!r}"
                )
        elif not (isinstance(segm, list) and all(isinstance(p, list) and len(p) % 2 == 0 for p in segm)):
            raise ValueError(f"{where}: segmentation must be a list of polygons [x1, y1, x2, y2, ...] or an RLE")
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = _area(ann, img) if segm else float(box[2] * box[3])


def _area(ann: dict[str, Any], img: dict[str, Any]) -> float:
    """The pixel area of an annotation's segmentation (what COCO's ``area`` holds)."""
    _, mask_utils = _pycocotools()
    segm, h, w = ann["segmentation"], img["height"], img["width"]
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return float(mask_utils.area(rle))


class CocoDetection(DetectionDataset):
    """COCO instances in COCO's own layout: ``root/annotations/instances_{split}{year}.json`` and the images in
    ``root/{split}{year}/<file_name>``; splits ``train`` and ``val``.

    Categories (COCO's ids 1..90 with gaps, or any ids) become labels ``1..K`` in sorted id order (``cat_ids``).
    Boxes come from the annotations' ``bbox`` (xywh -> xyxy), clipped to the image (detectron2's rule); those of
    zero area after clipping or of negative size are skipped, both counted in one :class:`AnnotationWarning`. Masks
    (polygons, compressed and uncompressed RLE) are decoded by pycocotools' ``annToMask``. Crowd regions
    (``iscrowd: 1``) are left out of the targets but stay in ``coco`` (COCOeval ignores detections on them).

    ``skip_empty`` (default: true for ``train``) drops the images without a target (detectron2's
    ``FILTER_EMPTY_ANNOTATIONS``); ``load_size`` scales each image so its longer side is at most that (bilinear,
    antialiased; boxes with it, masks nearest), None keeps the file's size; ``label_fraction``/``seed`` keep a
    seeded random fraction of the images (at least one). ``has_masks`` is false when some annotation has no
    segmentation (box-only files): targets then have no ``"masks"``. ``coco`` holds the whole split at the files'
    sizes, ``image_ids`` the kept images in sample order.

    Refused at construction, with one line naming the file: malformed JSON or a file without COCO's keys, fields,
    or ids (``ValueError``), image files that do not exist (``FileNotFoundError``, the first one and the count).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        year: str = "2017",
        load_size: int | None = None,
        skip_empty: bool | None = None,
        label_fraction: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ):
        if split not in COCO_SPLITS:
            raise ValueError(f"unknown COCO split {split!r}; valid splits: {', '.join(COCO_SPLITS)}")
        root = Path(root)
        ann_file = root / "annotations" / f"instances_{split}{year}.json"
        image_dir = root / f"{split}{year}"
        if not ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
        self.load_size = check_load_size(load_size)
        data = _read_json(ann_file)
        _check_records(ann_file, data)
        self.coco = coco_from_dict(data)

        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in cats]
        self.classes = tuple(str(c["name"]) for c in cats)
        self.num_classes = len(self.classes)
        label_of = {cid: k + 1 for k, cid in enumerate(self.cat_ids)}

        skip_empty = split == "train" if skip_empty is None else bool(skip_empty)
        clipped: list[tuple[Any, Any]] = []  # (annotation id, image id)
        skipped: list[tuple[Any, Any]] = []
        has_masks = True
        kept: list[tuple[Any, np.ndarray, np.ndarray, np.ndarray]] = []  # image id, ann ids, boxes, labels
        for img_id in sorted(self.coco.imgs):
            img = self.coco.imgs[img_id]
            h, w = img["height"], img["width"]
            ann_ids, boxes, labels = [], [], []
            for ann in self.coco.imgToAnns.get(img_id, []):
                if ann["iscrowd"]:
                    continue
                x, y, bw, bh = ann["bbox"]
                if bw < 0 or bh < 0:
                    skipped.append((ann["id"], img_id))
                    continue
                box = [min(max(x, 0), w), min(max(y, 0), h), min(max(x + bw, 0), w), min(max(y + bh, 0), h)]
                if box[2] <= box[0] or box[3] <= box[1]:
                    skipped.append((ann["id"], img_id))
                    continue
                if box != [x, y, x + bw, y + bh]:
                    clipped.append((ann["id"], img_id))
                has_masks &= bool(ann["segmentation"])
                ann_ids.append(ann["id"])
                boxes.append(box)
                labels.append(label_of[ann["category_id"]])
            if ann_ids or not skip_empty:
                kept.append((img_id, np.array(ann_ids), np.array(boxes, np.float32).reshape(-1, 4), np.array(labels)))
        _warn_boxes(ann_file, clipped, skipped)

        self.indices = random_subset(len(kept), label_fraction, seed)
        kept = [kept[i] for i in self.indices]
        self.image_ids = [k[0] for k in kept]
        self._anns = [k[1:] for k in kept]
        self.orig_sizes = [(self.coco.imgs[i]["height"], self.coco.imgs[i]["width"]) for i in self.image_ids]
        self.files = [str(image_dir / self.coco.imgs[i]["file_name"]) for i in self.image_ids]
        missing = [f for f in self.files if not os.path.isfile(f)]
        if missing:
            more = f" ({len(missing)} of the {len(self.files)} images listed in {ann_file} are missing)"
            raise FileNotFoundError(f"COCO image not found: {missing[0]}{more}")

        self.root = str(root)
        self.split = split
        self.year = year
        self.skip_empty = skip_empty
        self.label_fraction = float(label_fraction)
        self.has_masks = has_masks
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self._warned: set[str] = set()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, DetectionTarget] | tuple[None, None]:
        """``(image (3, H, W), {"boxes": float32 (N, 4), "labels": int64 (N,), "masks": uint8 (N, H, W),
        "image_id": int})``, or ``(None, None)`` when the image file cannot be decoded."""
        path, img_id = self.files[i], self.image_ids[i]
        try:
            img = decode_image(path, 3, warned=self._warned)
        except UnsupportedImageError:
            raise  # a format to convert, not a bad file
        except _DECODE_ERRORS as e:
            return self._bad(path, f"could not read image {path}", e)
        h, w = self.orig_sizes[i]
        if image_size(img) != (w, h):
            raise ValueError(
                f"{path}: the image is {image_size(img)[0]}x{image_size(img)[1]} but its annotation file says "
                f"{w}x{h} (image id {img_id})"
            )
        ann_ids, boxes, labels = self._anns[i]
        target: DetectionTarget = {
            "boxes": torch.from_numpy(boxes.copy()),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "image_id": int(img_id),
        }
        if self.has_masks:
            masks = [self.coco.annToMask(self.coco.anns[a.item()]) for a in ann_ids]
            target["masks"] = torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), np.uint8))
        return _scale_sample(img, target, self.load_size)

    def __repr__(self) -> str:
        return (
            f"CocoDetection(root={self.root!r}, split={self.split!r}, n={len(self)}, classes={self.num_classes}, "
            f"load_size={self.load_size})"
        )


def _warn_boxes(path: Path, clipped: list[tuple[Any, Any]], skipped: list[tuple[Any, Any]]) -> None:
    parts = []
    if clipped:
        (a, i), n = clipped[0], len(clipped)
        parts.append(f"{n} box(es) partly outside their image clipped to it (first: annotation {a} of image {i})")
    if skipped:
        (a, i), n = skipped[0], len(skipped)
        parts.append(
            f"{n} box(es) of zero area after clipping or of negative width/height skipped (first: annotation {a} "
            f"of image {i})"
        )
    if parts:
        warnings.warn(f"{path}: {'; '.join(parts)}", AnnotationWarning, stacklevel=3)


def _scale_sample(
    img: Image.Image | torch.Tensor, target: DetectionTarget, load_size: int | None
) -> tuple[torch.Tensor, DetectionTarget]:
    """The image as a tensor, with the image, boxes and masks scaled so the longer side is at most ``load_size``."""
    w, h = image_size(img)
    new_h, new_w = scaled_size(h, w, load_size)
    if (new_h, new_w) == (h, w):
        return image_tensor(img), target
    image = resize_image(img, (new_w, new_h), Image.Resampling.BILINEAR)
    # per-axis factors: the rounded size's, so a box edge on the image's edge stays on it
    target["boxes"] = target["boxes"] * torch.tensor([new_w / w, new_h / h] * 2, dtype=torch.float32)
    if "masks" in target:
        rows, cols = _nearest_indices(h, new_h), _nearest_indices(w, new_w)
        target["masks"] = target["masks"][:, rows][:, :, cols].contiguous()
    return image, target


# ----------------------------------------------------------------------------------------------------------- writer


def encode_rle(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """Masks ``(N, H, W)`` (0/1) as COCO's compressed RLE, ``{"size": [H, W], "counts": str}`` each (JSON-ready:
    the form of COCO results and of ``coco`` ground truth)."""
    _, mask_utils = _pycocotools()
    m = np.asarray(masks.numpy() if isinstance(masks, torch.Tensor) else masks, dtype=np.uint8)
    rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))  # pycocotools wants (H, W, N), column-major
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def mask_polygon(mask: np.ndarray) -> list[float] | None:
    """A mask ``(H, W)`` as one COCO polygon ``[x1, y1, x2, y2, ...]`` (pixel edges: pixel ``(r, c)`` spans ``[c,
    c + 1] x [r, r + 1]``) when pycocotools rasterizes it back to exactly the mask; None otherwise (several parts,
    holes, or an outline that does not round-trip): those stay RLE.

    The outline is marching squares at level 0.5 (contourpy, which matplotlib brings): it runs through the pixel edges'
    midpoints and cuts the corners, which the rasterizer (pixel centres) does not see.
    """
    import contourpy

    _, mask_utils = _pycocotools()
    h, w = mask.shape
    padded = np.pad(mask.astype(np.float64), 1)  # closed outlines where the mask touches the border
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    if len(lines) != 1:
        return None
    # contour coordinates are (col, row) of the padded grid's pixel centres: -1 for the pad, +0.5 for the centre
    poly = (lines[0][:-1] - 0.5).ravel().tolist()  # the last point repeats the first
    if len(poly) < 6:
        return None
    back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w)))
    return poly if np.array_equal(back, mask.astype(np.uint8)) else None


def target_annotations(
    target: DetectionTarget, cat_ids: Sequence[int], first_id: int, *, polygons: bool = False
) -> list[dict[str, Any]]:
    """COCO annotations (ids from ``first_id``) of one sample's target: ``bbox`` xywh, ``category_id`` of each label
    through ``cat_ids``, ``iscrowd`` 0, ``segmentation`` compressed RLE or (``polygons``) one polygon where it
    round-trips exactly (:func:`mask_polygon`), ``area`` the mask's pixels (the box's without masks)."""
    boxes = target["boxes"].tolist()
    labels = target["labels"].tolist()
    masks = target.get("masks")
    rles = encode_rle(masks) if masks is not None else [None] * len(boxes)
    anns = []
    for j, ((x1, y1, x2, y2), label, rle) in enumerate(zip(boxes, labels, rles, strict=True)):
        if masks is None:
            segm, area = [], (x2 - x1) * (y2 - y1)
        else:
            poly = mask_polygon(masks[j].numpy()) if polygons else None
            segm, area = ([poly] if poly is not None else rle), int(masks[j].sum())
        anns.append({
            "id": first_id + j,
            "image_id": int(target["image_id"]),
            "category_id": int(cat_ids[label - 1]),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": float(area),
            "iscrowd": 0,
            "segmentation": segm,
        })  # fmt: skip
    return anns


def coco_categories(dataset: DetectionDataset) -> list[dict[str, Any]]:
    return [{"id": int(c), "name": n} for c, n in zip(dataset.cat_ids, dataset.classes, strict=True)]


def write_coco(dataset: DetectionDataset, root: str | os.PathLike, split: str, *, year: str = "2017") -> Path:
    """Write a detection dataset in COCO's layout, so that ``CocoDetection(root, split, year=year)`` reads it back:
    every sample's image as ``root/{split}{year}/{image_id:012d}.png`` and ``root/annotations/instances_{split}{year}
    .json`` with its targets (:func:`target_annotations`: one polygon where the mask is one part without holes and
    round-trips exactly, compressed RLE otherwise) and the categories ``cat_ids`` with their names. Files are written
    atomically, the JSON last. Returns the JSON's path. Only 8-bit images (PNG) are written."""
    root = Path(root)
    image_dir = root / f"{split}{year}"
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(len(dataset)):
        image, target = dataset[i]
        if image is None:
            raise ValueError(f"cannot write sample {i} of {dataset!r}: its image could not be read")
        if image.dtype != torch.uint8:
            raise ValueError(f"cannot write sample {i} of {dataset!r}: {image.dtype} pixels (only uint8 go to PNG)")
        pixels = image.permute(1, 2, 0).numpy()  # (H, W, 3)
        file_name = f"{int(target['image_id']):012d}.png"
        atomic_write(image_dir / file_name, lambda f, p=pixels: Image.fromarray(p).save(f, format="PNG"), mode="wb")
        images.append({"id": int(target["image_id"]), "file_name": file_name, "height": pixels.shape[0],
                       "width": pixels.shape[1]})  # fmt: skip
        annotations += target_annotations(target, dataset.cat_ids, len(annotations) + 1, polygons=True)
    data = {
        "info": {"description": f"written by mal.data.write_coco from {dataset!r}"},
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(dataset),
    }
    path = root / "annotations" / f"instances_{split}{year}.json"
    return atomic_write(path, lambda f: json.dump(data, f, separators=(",", ":")))
