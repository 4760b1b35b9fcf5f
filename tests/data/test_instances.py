"""Instance data: the procedural instances, the COCO reader and writer, detection collate, COCOeval on the ground
truth."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval
from scipy import ndimage

from mal.data import (
    DATASETS,
    MIN_VISIBLE_PIXELS,
    AnnotationWarning,
    BadImageWarning,
    CocoDetection,
    DataSettings,
    ProceduralInstancesDataset,
    ProceduralScenesDataset,
    build_dataset,
    build_splits,
    collate,
    dataset_options,
    encode_rle,
    heldout_split,
    render_scene,
    write_coco,
)

VAL_STREAM = 1  # the scenes' random stream of the val split


def tight_box(mask: torch.Tensor) -> list[float]:
    """``[x1, y1, x2, y2]`` in pixel edges of a non-empty ``(H, W)`` mask."""
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def check_target(image: torch.Tensor, target: dict, num_classes: int) -> None:
    n = len(target["labels"])
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
    assert target["labels"].dtype == torch.int64 and ((target["labels"] >= 1) & (target["labels"] <= num_classes)).all()
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (n, *image.shape[1:])
    assert isinstance(target["image_id"], int)


# -------------------------------------------------------------------------------------------- procedural instances


@pytest.fixture(scope="module")
def val40():
    # scenes 8, 11, 21, 38 hide a shape completely, scene 19 leaves one a single pixel
    return ProceduralInstancesDataset("val", num_samples=40)


def test_instances_are_the_visible_parts_of_the_rendered_shapes(val40):
    scenes = ProceduralScenesDataset("val", load_size=64, num_samples=40)
    dropped = 0
    for i in range(len(val40)):
        image, target = val40[i]
        check_target(image, target, 4)
        scene = render_scene(np.random.default_rng([0, VAL_STREAM, i]), (64, 64))
        assert torch.equal(image, torch.from_numpy(scene.image)) and torch.equal(image, scenes[i][0])
        # who owns each pixel: the last (nearest) shape painted there
        owner = np.full(scene.mask.shape, -1)
        for j, (_, _, footprint) in enumerate(scene.shapes):
            owner[footprint] = j
        visible = [(cls, owner == j) for j, (cls, _, _) in enumerate(scene.shapes)]
        expected = [(cls, m) for cls, m in visible if m.sum() >= MIN_VISIBLE_PIXELS]
        dropped += sum(0 < m.sum() < MIN_VISIBLE_PIXELS for _, m in visible)
        assert target["labels"].tolist() == [cls for cls, _ in expected]
        for got, (_, want) in zip(target["masks"], expected, strict=True):
            assert np.array_equal(got.numpy(), want.astype(np.uint8))
        # every shape pixel of the scene's mask is in exactly one instance, of its class (but the dropped slivers')
        covered = target["masks"].sum(0).numpy()
        kept = np.isin(owner, [j for j, (_, m) in enumerate(visible) if m.sum() >= MIN_VISIBLE_PIXELS])
        assert covered.max(initial=0) <= 1 and np.array_equal(covered == 1, kept)
        assert np.array_equal(kept, (scene.mask > 0) & kept)
        label_map = (target["masks"] * target["labels"][:, None, None]).sum(0).numpy()
        assert np.array_equal(label_map[kept], scene.mask[kept])
        assert val40.image_ids[i] == target["image_id"] == i + 1
    assert dropped >= 1  # the sample holds a sliver below the threshold


def test_instance_boxes_are_the_masks_tight_boxes(val40):
    n = 0
    for i in range(len(val40)):
        _, target = val40[i]
        for box, mask in zip(target["boxes"], target["masks"], strict=True):
            assert box.tolist() == tight_box(mask)
            n += 1
    assert n > 60


def test_instances_dataset_attributes_and_registry():
    ds = build_dataset("instances", "test", num_samples=5, scene_seed=2)
    assert isinstance(ds, ProceduralInstancesDataset) and ds.detection and DATASETS["instances"] is type(ds)
    assert (ds.classes, ds.num_classes, ds.cat_ids, ds.channels) == (
        ("disc", "square", "triangle", "ring"), 4, [1, 2, 3, 4], 3
    )  # fmt: skip
    assert ds.has_masks and ds.load_size == 64 and ds.orig_sizes == [(64, 64)] * 5 and ds.scene_seed == 2
    assert [len(ProceduralInstancesDataset(s)) for s in ("train", "val", "test")] == [2000, 200, 500]
    assert ProceduralInstancesDataset("val", load_size=32, num_samples=2)[1][0].shape == (3, 32, 32)
    assert dataset_options("instances") == ["num_samples", "scene_seed", "cache"]
    assert heldout_split("instances") == "test" and heldout_split("coco") == "val"
    with pytest.raises(ValueError, match="one positive int"):
        ProceduralInstancesDataset("val", load_size=(32, 48))
    with pytest.raises(ValueError, match="valid splits: train, val, test"):
        ProceduralInstancesDataset("training")
    a, b = ProceduralInstancesDataset("val", num_samples=3), ProceduralInstancesDataset("val", 64, 3, cache=False)
    a[0][1]["masks"].fill_(7)  # a caller writing into a sample does not change the cache
    assert all(torch.equal(a[i][1]["masks"], b[i][1]["masks"]) for i in range(3))


def test_instances_label_fraction_keeps_a_seeded_subset_of_the_same_scenes(val40):
    few = ProceduralInstancesDataset("val", num_samples=40, label_fraction=0.25, seed=1)
    other = ProceduralInstancesDataset("val", num_samples=40, label_fraction=0.25, seed=2)
    assert len(few) == 10 and few.image_ids != other.image_ids
    assert few.image_ids == [int(k) + 1 for k in few.indices]
    for i in range(len(few)):
        image, target = few[i]
        k = target["image_id"] - 1
        assert torch.equal(image, val40[k][0]) and torch.equal(target["masks"], val40[k][1]["masks"])
    assert sorted(few.coco.getImgIds()) == few.image_ids


# ---------------------------------------------------------------------------------------------------- COCO files


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written out: run lengths of the column-major pixels, starting with a run of 0s."""
    flat = mask.flatten(order="F").astype(np.uint8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def rect(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[rows, cols] = 1
    return m


# image 1 (40 wide, 30 high): the masks of its four instances as the reader must give them
M_POLY = rect(30, 40, slice(3, 8), slice(2, 10))  # polygon [2, 3] - [10, 8]
M_UNCOMPRESSED = rect(30, 40, slice(10, 20), slice(12, 16)) | rect(30, 40, slice(16, 20), slice(16, 22))  # an L
_yy, _xx = np.mgrid[:30, :40]
M_COMPRESSED = (((_yy - 20) ** 2 + (_xx - 6) ** 2) <= 16).astype(np.uint8)  # a disc about (6, 20)
M_CLIPPED = rect(30, 40, slice(22, 30), slice(32, 40))  # a 20 x 20 square at (32, 22), cut by the image's edges
M_CROWD = rect(30, 40, slice(0, 5), slice(30, 40))


def coco_json() -> dict:
    compressed = mask_utils.encode(np.asfortranarray(M_COMPRESSED))
    compressed["counts"] = compressed["counts"].decode("ascii")
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 24, "height": 20},  # no annotations
            {"id": 3, "file_name": "c.png", "width": 16, "height": 16},  # a crowd region only
        ],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [2, 3, 8, 5], "area": 40.0, "iscrowd": 0,
             "segmentation": [[2, 3, 10, 3, 10, 8, 2, 8]]},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [12, 10, 10, 10], "area": 64.0, "iscrowd": 0,
             "segmentation": uncompressed_rle(M_UNCOMPRESSED)},
            {"id": 12, "image_id": 1, "category_id": 90, "bbox": [2, 16, 9, 9], "iscrowd": 0,
             "segmentation": compressed},  # no "area": computed
            {"id": 13, "image_id": 1, "category_id": 3, "bbox": [30, 0, 10, 5], "area": 50.0, "iscrowd": 1,
             "segmentation": uncompressed_rle(M_CROWD)},
            {"id": 14, "image_id": 1, "category_id": 7, "bbox": [32, 22, 20, 20], "area": 400.0, "iscrowd": 0,
             "segmentation": [[32, 22, 52, 22, 52, 42, 32, 42]]},
            {"id": 15, "image_id": 1, "category_id": 3, "bbox": [5, 20, 0, 4], "area": 0.0, "iscrowd": 0,
             "segmentation": [[5, 20, 6, 20, 6, 24]]},
            {"id": 16, "image_id": 1, "category_id": 3, "bbox": [5, 20, -3, 4], "area": 0.0, "iscrowd": 0,
             "segmentation": [[5, 20, 6, 20, 6, 24]]},
            {"id": 17, "image_id": 3, "category_id": 90, "bbox": [0, 0, 8, 8], "area": 64.0, "iscrowd": 1,
             "segmentation": uncompressed_rle(rect(16, 16, slice(0, 8), slice(0, 8)))},
        ],
    }  # fmt: skip


@pytest.fixture
def coco_root(tmp_path):
    """A COCO folder, both splits the same: :func:`coco_json` and its three images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (tmp_path / f"{split}2017").mkdir()
        for name, (w, h) in {"a.png": (40, 30), "b.png": (24, 20), "c.png": (16, 16)}.items():
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{split}2017" / name)
    (tmp_path / "annotations").mkdir()
    for split in ("train", "val"):
        (tmp_path / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco_json()))
    return tmp_path


def load(root, split: str, **kw) -> CocoDetection:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnnotationWarning)
        return CocoDetection(root, split, **kw)


def test_coco_reader_decodes_polygons_and_both_rles_and_maps_categories(coco_root):
    with pytest.warns(AnnotationWarning) as record:
        ds = CocoDetection(coco_root, "val")
    assert len(record) == 1  # once per dataset, with the counts
    message = str(record[0].message)
    assert "instances_val2017.json" in message and "\n" not in message
    assert "1 box(es) partly outside their image clipped" in message and "annotation 14 of image 1" in message
    assert "2 box(es) of zero area after clipping or of negative width/height skipped" in message
    assert (ds.classes, ds.cat_ids, ds.num_classes) == (("car", "train", "toothbrush"), [3, 7, 90], 3)
    assert ds.detection and ds.has_masks and ds.channels == 3 and ds.load_size is None
    assert ds.image_ids == [1, 2, 3] and ds.orig_sizes == [(30, 40), (20, 24), (16, 16)]  # val keeps empty images
    image, target = ds[0]
    check_target(image, target, 3)
    with Image.open(coco_root / "val2017" / "a.png") as f:
        assert torch.equal(image, torch.from_numpy(np.array(f)).permute(2, 0, 1))
    assert target["image_id"] == 1 and target["labels"].tolist() == [1, 2, 3, 2]  # ids 3, 7, 90, 7
    assert target["boxes"].tolist() == [[2, 3, 10, 8], [12, 10, 22, 20], [2, 16, 11, 25], [32, 22, 40, 30]]
    for got, want in zip(target["masks"], [M_POLY, M_UNCOMPRESSED, M_COMPRESSED, M_CLIPPED], strict=True):
        assert np.array_equal(got.numpy(), want)
    for i, (h, w) in ((1, (20, 24)), (2, (16, 16))):
        image, target = ds[i]
        check_target(image, target, 3)
        assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, h, w) and image.shape == (3, h, w)
    # the ground truth keeps the crowd regions and every annotation for evaluation
    assert sorted(ds.coco.getAnnIds(imgIds=[1])) == [10, 11, 12, 13, 14, 15, 16]
    assert ds.coco.anns[13]["iscrowd"] == 1 and ds.coco.anns[12]["area"] == float(M_COMPRESSED.sum())


def test_coco_training_split_drops_images_without_targets(coco_root):
    train = load(coco_root, "train")
    assert train.image_ids == [1] and train.skip_empty  # image 2: nothing; image 3: a crowd region only
    assert load(coco_root, "train", skip_empty=False).image_ids == [1, 2, 3]
    assert load(coco_root, "val", skip_empty=True).image_ids == [1]
    assert dataset_options("coco") == ["year", "skip_empty"]
    ds = build_dataset("coco", "val", root=coco_root)
    assert isinstance(ds, CocoDetection) and len(ds) == 3
    with pytest.raises(ValueError, match="needs data.root"):
        build_dataset("coco", "val")
    with pytest.raises(ValueError, match="valid splits: train, val"):
        CocoDetection(coco_root, "test")


def test_coco_refuses_a_missing_image_file_in_one_line(coco_root):
    (coco_root / "val2017" / "c.png").unlink()
    (coco_root / "val2017" / "b.png").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load(coco_root, "val")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"COCO image not found: {coco_root / 'val2017' / 'b.png'}")
    assert "2 of the 3 images" in msg
    assert len(load(coco_root, "train")) == 1  # dropped empty images need no file


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"images": [', "not valid JSON"),
        ('{"images": []}', "not a COCO instances file"),
        ("[1, 2]", "not a COCO instances file"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}', "image id 1 has no 'file_name'"),
    ],
)
def test_coco_refuses_a_malformed_annotation_file_in_one_line(coco_root, content, match):
    path = coco_root / "annotations" / "instances_val2017.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        CocoDetection(coco_root, "val")
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_coco_refuses_annotations_that_do_not_resolve(coco_root):
    path = coco_root / "annotations" / "instances_val2017.json"
    for change, match in [
        (lambda d: d["annotations"][0].update(image_id=9), "annotation 10 refers to image 9"),
        (lambda d: d["annotations"][1].update(category_id=4), "annotation 11 has category 4"),
        (lambda d: d["annotations"][1]["segmentation"].update(size=[3, 4]), "annotation 11: an RLE"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2]), r"annotation 10: bbox must be \[x, y, width, height\]"),
    ]:
        data = coco_json()
        change(data)
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=match):
            load(coco_root, "val")


def test_coco_unreadable_image_gives_none_and_a_warning_once(coco_root):
    (coco_root / "val2017" / "a.png").write_bytes(b"\x89PNG not really")
    ds = load(coco_root, "val")
    with pytest.warns(BadImageWarning, match="a.png"):
        assert ds[0] == (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[0] == (None, None)  # warned once
    assert ds[1][0] is not None


def test_coco_refuses_an_image_of_another_size_than_its_annotation(coco_root):
    Image.fromarray(np.zeros((20, 25, 3), np.uint8)).save(coco_root / "val2017" / "b.png")
    with pytest.raises(ValueError, match=r"b.png: the image is 25x20 but its annotation file says 24x20 \(image id"):
        load(coco_root, "val")[1]


def test_coco_load_size_scales_image_boxes_and_masks_together(coco_root):
    full, half = load(coco_root, "val"), load(coco_root, "val", load_size=20)
    image, target = half[0]  # 40 x 30 -> 20 x 15: a factor of exactly 1/2
    _, full_target = full[0]
    assert image.shape == (3, 15, 20) and half.orig_sizes[0] == (30, 40)
    with Image.open(coco_root / "val2017" / "a.png") as f:
        want = np.asarray(f.convert("RGB").resize((20, 15), Image.Resampling.BILINEAR))
    assert torch.equal(image, torch.from_numpy(want).permute(2, 0, 1))
    assert torch.equal(target["boxes"], full_target["boxes"] / 2)
    # nearest: output pixel j samples the input pixel under its centre, 2 j + 1
    assert torch.equal(target["masks"], full_target["masks"][:, 1::2, 1::2])
    assert half[1][0].shape == (3, 17, 20) and half[1][1]["masks"].shape == (0, 17, 20)  # 24 x 20 -> 20 x 16.7
    assert half[2][0].shape == (3, 16, 16)  # never enlarged
    with pytest.raises(ValueError, match="one positive int"):
        CocoDetection(coco_root, "val", load_size=(20, 20))


# ------------------------------------------------------------------------------------------------ writer, round trip


@pytest.fixture
def written(tmp_path, val40):
    write_coco(val40, tmp_path, "val")
    return tmp_path


def test_write_coco_then_coco_detection_gives_back_the_generator_samples(written, val40):
    data = json.loads((written / "annotations" / "instances_val2017.json").read_text())
    kinds = [type(a["segmentation"]).__name__ for a in data["annotations"]]
    assert kinds.count("list") > len(kinds) / 2 and kinds.count("dict") > 10  # polygons and RLE both
    back = CocoDetection(written, "val")
    # a polygon only for one part without holes: the masks with a hole (rings) or of several parts are RLE
    masks = [back.coco.annToMask(a) for a in data["annotations"]]
    simple = [ndimage.label(m)[1] == 1 and np.array_equal(ndimage.binary_fill_holes(m), m) for m in masks]
    assert not any(kind == "list" and not ok for kind, ok in zip(kinds, simple, strict=True))
    assert any(not ok and a["category_id"] == 4 for a, ok in zip(data["annotations"], simple, strict=True))
    assert data["categories"] == [{"id": k, "name": n} for k, n in enumerate(val40.classes, 1)]
    assert back.image_ids == val40.image_ids and back.classes == val40.classes and back.cat_ids == val40.cat_ids
    for i in range(len(val40)):
        (image, target), (image_back, target_back) = val40[i], back[i]
        assert torch.equal(image, image_back) and target["image_id"] == target_back["image_id"]
        for key in ("boxes", "labels", "masks"):  # polygons included: written only where they round-trip exactly
            assert torch.equal(target[key], target_back[key]), (i, key)


def test_load_size_keeps_boxes_on_their_masks(written):
    """Boxes scale exactly, masks by nearest sampling: every kept mask pixel's centre lies in its box, and the box is
    the mask's tight box to a pixel except where a thin tip fell between the sampled pixels."""
    small = CocoDetection(written, "val", load_size=32)
    errors = []
    for i in range(len(small)):
        image, target = small[i]
        assert image.shape == (3, 32, 32)
        for box, mask in zip(target["boxes"], target["masks"], strict=True):
            ys, xs = mask.nonzero(as_tuple=True)
            x1, y1, x2, y2 = box.tolist()
            assert ((xs + 0.5 >= x1) & (xs + 0.5 <= x2) & (ys + 0.5 >= y1) & (ys + 0.5 <= y2)).all()
            if len(xs):
                errors.append(max(abs(a - b) for a, b in zip(box.tolist(), tight_box(mask), strict=True)))
    assert len(errors) > 60 and np.mean(np.array(errors) <= 1.0) > 0.9


def test_coco_label_fraction_keeps_a_seeded_subset(written):
    full = CocoDetection(written, "val")
    few = CocoDetection(written, "val", label_fraction=0.25, seed=1)
    assert len(few) == 10 and set(few.image_ids) < set(full.image_ids)
    assert few.image_ids != CocoDetection(written, "val", label_fraction=0.25, seed=2).image_ids
    for i in range(len(few)):
        k = full.image_ids.index(few.image_ids[i])
        assert torch.equal(few[i][1]["masks"], full[k][1]["masks"])
    train, _ = build_splits(DataSettings(name="coco", root=str(written), train_split="val", val_split=None),
                            label_fraction=0.25, seed=1)  # fmt: skip
    assert train.image_ids == few.image_ids


# --------------------------------------------------------------------------------------------------------- collate


def test_collate_keeps_detection_samples_as_lists_and_counts_bad_ones(val40):
    batch = collate([val40[0], (None, None), val40[1]])
    assert batch["num_bad"] == 1 and batch["labels"] is None
    assert [x.shape for x in batch["images"]] == [(3, 64, 64)] * 2
    assert [t["image_id"] for t in batch["targets"]] == [1, 2]
    assert torch.equal(batch["targets"][1]["masks"], val40[1][1]["masks"])
    assert collate([(None, None)] * 2)["images"] is None


def test_detection_datasets_pickle_for_loader_workers(coco_root, val40):
    for ds in (load(coco_root, "val"), val40):
        ds.coco  # noqa: B018 (built, so that it travels too)
        copy = pickle.loads(pickle.dumps(ds))
        assert copy.image_ids == ds.image_ids and copy.coco.getAnnIds() == ds.coco.getAnnIds()
        assert torch.equal(copy[0][1]["masks"], ds[0][1]["masks"])


# ------------------------------------------------------------------------------------------------------- evaluation


def perfect_results(ds) -> list[dict]:
    """The targets as COCO results, labels back to COCO ids through ``cat_ids``: what an evaluator sends."""
    results = []
    for i in range(len(ds)):
        _, target = ds[i]
        rles = encode_rle(target["masks"])
        for (x1, y1, x2, y2), label, rle in zip(target["boxes"].tolist(), target["labels"].tolist(), rles, strict=True):
            results.append({
                "image_id": target["image_id"], "category_id": ds.cat_ids[label - 1], "score": 1.0,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": rle,
            })  # fmt: skip
    return results


def coco_ap(ds, results: list[dict], iou_type: str) -> float:
    """COCOeval's AP @ IoU 0.50:0.95 of ``results`` against ``ds.coco`` on the dataset's images."""
    e = COCOeval(ds.coco, ds.coco.loadRes(results), iou_type)
    e.params.imgIds = ds.image_ids
    with contextlib.redirect_stdout(io.StringIO()):
        e.evaluate()
        e.accumulate()
        e.summarize()
    return float(e.stats[0])


@pytest.mark.parametrize("source", ["memory", "files"])
def test_the_ground_truth_scores_a_perfect_prediction_at_ap_1(tmp_path, source):
    ds = ProceduralInstancesDataset("val", num_samples=12)
    ds.cat_ids = [3, 7, 42, 90]  # COCO-like ids, so that a wrong label -> id mapping shows
    if source == "files":
        write_coco(ds, tmp_path, "val")
        ds = CocoDetection(tmp_path, "val")
        assert ds.cat_ids == [3, 7, 42, 90]
    results = perfect_results(ds)
    assert coco_ap(ds, results, "bbox") == pytest.approx(1.0)
    assert coco_ap(ds, results, "segm") == pytest.approx(1.0)
    # the check can fail: the right boxes under the wrong categories score nothing
    shifted = [{**r, "category_id": ds.cat_ids[(ds.cat_ids.index(r["category_id"]) + 1) % 4]} for r in results]
    assert coco_ap(ds, shifted, "bbox") < 0.1
