"""Dense data: NYU Depth v2 (.mat/HDF5), ADE20K folders, procedural scenes, DenseConcat, dense collate, JointAugment."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy.io import savemat
from torch.utils.data import DataLoader

from helpers import NYU_SHAPE, ade_folder, nyu_arrays, nyu_file
from mal.config import ConfigError, load_config
from mal.data import (
    DATASETS,
    IMAGENET_MEAN,
    SCENE_CLASSES,
    ADE20KDataset,
    BadImageWarning,
    DataSettings,
    DenseConcat,
    JointAugment,
    MixturePart,
    NYUDepthV2Dataset,
    ProceduralScenesDataset,
    TaskView,
    build_dataset,
    build_splits,
    collate,
    denormalize,
)
from mal.data.mixture import weighted_indices
from mal.data.scenes import _scene_stats
from mal.tasks.depth import depth_loss
from mal.tasks.segmentation import seg_loss

# ---------------------------------------------------------------------------------------------------- NYU Depth v2

N, H, W = NYU_SHAPE


@pytest.fixture
def nyu(tmp_path):
    return nyu_file(tmp_path / "nyu_depth_v2_labeled.mat")


def test_nyu_samples_come_back_in_h_w_orientation(nyu):
    image, depth, labels = nyu_arrays()
    ds = NYUDepthV2Dataset(nyu, "train", load_size=(H, W), segmentation=True)
    assert ds.split_source == "seeded" and "seeded" in repr(ds)
    assert (ds.num_classes, ds.channels, ds.load_size, ds.has_depth, ds.has_seg) == (894, 3, (24, 32), True, True)
    assert ds.mean == IMAGENET_MEAN and ds.max_depth > 0
    for i in range(len(ds)):
        k = int(ds.indices[i])
        img, target = ds[i]
        assert img.shape == (3, 24, 32) and img.dtype == torch.uint8
        assert target["depth"].shape == (24, 32) and target["depth"].dtype == torch.float32
        assert target["mask"].shape == (24, 32) and target["mask"].dtype == torch.int64
        assert torch.equal(img, torch.from_numpy(image[k]))
        assert torch.allclose(target["depth"], torch.from_numpy(depth[k]))
        expected = np.where(labels[k] == 0, 255, labels[k].astype(np.int64) - 1)  # 0 -> ignore, k -> k - 1
        assert torch.equal(target["mask"], torch.from_numpy(expected))
        assert set(target["mask"].unique().tolist()) <= {0, 1, 2, 3, 255}


def test_nyu_resize_is_nearest_for_depth_and_mask(nyu):
    image, depth, labels = nyu_arrays()
    ds = NYUDepthV2Dataset(nyu, "test", load_size=(12, 16), segmentation=True)
    img, target = ds[0]
    k = int(ds.indices[0])
    assert img.shape == (3, 12, 16) and target["depth"].shape == target["mask"].shape == (12, 16)
    # halving picks the second pixel of every 2x2 block (the one nearest the output pixel's centre)
    assert torch.equal(target["depth"], torch.from_numpy(depth[k, 1::2, 1::2]))
    assert torch.equal(target["mask"] == 255, torch.from_numpy(labels[k, 1::2, 1::2] == 0))
    # the antialiased image is close to the 2x2 block means
    means = image[k].astype(np.float64).reshape(3, 12, 2, 16, 2).mean(axis=(2, 4))
    assert np.abs(img.numpy().astype(np.float64) - means)[:, 1:-1, 1:-1].mean() < 3
    assert NYUDepthV2Dataset(nyu, "train", load_size=8)[0][0].shape == (3, 8, 8)


def test_nyu_seeded_split_partitions_the_file(nyu):
    train, test = NYUDepthV2Dataset(nyu, "train"), NYUDepthV2Dataset(nyu, "test")
    assert (len(train), len(test)) == (3, 3)  # round(6 * 795 / 1449) = 3
    assert sorted(train.indices.tolist() + test.indices.tolist()) == list(range(N))
    assert np.array_equal(NYUDepthV2Dataset(nyu, "val").indices, test.indices)
    assert np.array_equal(NYUDepthV2Dataset(nyu, "train").indices, train.indices)
    assert train.load_size == (240, 320) and train[0][0].shape == (3, 240, 320)


def test_nyu_official_splits_mat_is_used_when_present(nyu):
    savemat(nyu.parent / "splits.mat", {"trainNdxs": np.array([[1], [3], [5]]), "testNdxs": np.array([[2], [4]])})
    image, _, _ = nyu_arrays()
    train, test = NYUDepthV2Dataset(nyu, "train", load_size=(H, W)), NYUDepthV2Dataset(nyu, "test", load_size=(H, W))
    assert train.indices.tolist() == [0, 2, 4] and test.indices.tolist() == [1, 3]
    assert "splits.mat" in repr(train)
    assert torch.equal(test[1][0], torch.from_numpy(image[3]))


def test_nyu_class_map_and_no_segmentation(nyu, tmp_path):
    _, _, labels = nyu_arrays()
    lut = [255, 0, 0, 1, 1]  # raw 1, 2 -> 0; raw 3, 4 -> 1
    (tmp_path / "map.json").write_text(json.dumps(lut))
    np.save(tmp_path / "map.npy", np.array(lut))
    for name in ("map.json", "map.npy"):
        ds = NYUDepthV2Dataset(nyu, "train", load_size=(H, W), segmentation=True, class_map=tmp_path / name)
        assert ds.num_classes == 2 and len(ds.classes) == 2
        mask = ds[0][1]["mask"]
        assert torch.equal(mask, torch.from_numpy(np.array(lut)[labels[int(ds.indices[0])]]))
    plain = NYUDepthV2Dataset(nyu, "train", load_size=(H, W))  # the default: depth only (MAL-v1's use)
    assert not plain.has_seg and plain.has_depth
    _, target = plain[0]
    assert (target["mask"] == 255).all() and (target["depth"] > 0).all()


def test_nyu_errors_name_the_problem(nyu, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.mat"):
        NYUDepthV2Dataset(tmp_path / "nowhere.mat", "train")
    with pytest.raises(ValueError, match="train, test"):
        NYUDepthV2Dataset(nyu, "validation")
    (tmp_path / "v5.mat").write_bytes(b"MATLAB 5.0 MAT-file, not HDF5" + bytes(200))
    with pytest.raises(ValueError, match="HDF5"):
        NYUDepthV2Dataset(tmp_path / "v5.mat", "train")


def test_nyu_is_picklable_and_works_in_worker_processes(nyu):
    ds = NYUDepthV2Dataset(nyu, "train", load_size=(H, W))
    first = ds[0][0]  # opens the file in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[0][0], first)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert sum(len(b["images"]) for b in batches) == 3
    assert torch.equal(batches[0]["images"][0], first)


# ---------------------------------------------------------------------------------------------------------- ADE20K


@pytest.fixture
def ade(tmp_path):
    return ade_folder(tmp_path / "ADEChallengeData2016")


def test_ade20k_samples_crop_the_centre_and_map_labels(ade):
    ds = ADE20KDataset(ade, "train", load_size=16)
    assert len(ds) == 3 and ds.num_classes == 150 and len(ds.classes) == 150 and ds.classes[0] == "wall"
    assert (ds.has_depth, ds.has_seg, ds.load_size, ds.channels) == (False, True, (16, 16), 3)
    img, target = ds[0]  # ADE_a: 64x32 -> 32x16, the centre 16x16 is the middle third
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8
    assert (target["mask"] == 1).all()  # annotation 2 -> class 1
    assert img[1].float().mean() > 230 and img[0].float().mean() < 25 and img[2].float().mean() < 25
    assert target["depth"].dtype == torch.float32 and (target["depth"] == 0).all()
    _, target = ds[1]  # ADE_b: 20x40 -> 16x32, centre crop rows 8..23: top half 0 -> 255, bottom 150 -> 149
    mask = target["mask"]
    assert mask.dtype == torch.int64 and mask.shape == (16, 16)
    assert (mask[:8] == 255).all() and (mask[8:] == 149).all()
    val = ADE20KDataset(ade, "val", load_size=(8, 12))
    assert len(val) == 1 and val[0][0].shape == (3, 8, 12) and (val[0][1]["mask"] == 6).all()


def test_ade20k_corrupt_image_warns_once_and_collate_drops_it(ade):
    ds = ADE20KDataset(ade, "train", load_size=16)
    with pytest.warns(BadImageWarning, match="ADE_c.jpg"):
        assert ds[2] == (None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[2] == (None, None)
    loader = DataLoader(ADE20KDataset(ade, "train", load_size=16), batch_size=3, collate_fn=collate)
    with pytest.warns(BadImageWarning):
        (batch,) = list(loader)
    assert batch["num_bad"] == 1 and batch["labels"] is None
    assert batch["images"].shape == (2, 3, 16, 16) and batch["images"].dtype == torch.uint8
    assert batch["depth"].shape == (2, 16, 16) and batch["depth"].dtype == torch.float32
    assert batch["mask"].shape == (2, 16, 16) and batch["mask"].dtype == torch.int64
    all_bad = collate([(None, None), (None, None)])
    assert all_bad == {"images": None, "labels": None, "depth": None, "mask": None, "num_bad": 2}


def test_ade20k_missing_folders_annotations_and_bad_split(ade, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ADE20KDataset(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="train, val"):
        ADE20KDataset(ade, "test")
    (ade / "annotations" / "training" / "ADE_b.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_b.png"):
        ADE20KDataset(ade, "train")
    (ade / "annotations" / "validation" / "ADE_v.png").unlink()
    (ade / "annotations" / "validation").rmdir()
    with pytest.raises(FileNotFoundError, match="annotations.validation"):
        ADE20KDataset(ade, "val")


# ------------------------------------------------------------------------------------------------- procedural scenes


def test_scenes_shapes_dtypes_and_ranges():
    ds = ProceduralScenesDataset("val", num_samples=40)
    assert (ds.classes, ds.num_classes, ds.channels, ds.load_size) == (SCENE_CLASSES, 5, 3, (32, 32))
    assert ds.has_depth and ds.has_seg and len(ds) == 40
    seen = set()
    for i in range(len(ds)):
        img, target = ds[i]
        assert img.shape == (3, 32, 32) and img.dtype == torch.uint8
        depth, mask = target["depth"], target["mask"]
        assert depth.dtype == torch.float32 and mask.dtype == torch.int64
        assert (depth > 0).all() and (depth <= ds.max_depth).all()
        assert mask.min() >= 0 and mask.max() < ds.num_classes
        seen |= set(mask.unique().tolist())
    assert seen == set(range(5))
    assert ProceduralScenesDataset("train", load_size=(16, 24), num_samples=2)[1][0].shape == (3, 16, 24)
    assert [len(ProceduralScenesDataset(s)) for s in ("train", "val", "test")] == [2000, 200, 500]


def test_scene_classes_are_the_largest_visible_shape():
    dense = ProceduralScenesDataset("train", num_samples=60, label_fraction=0.5, seed=3)
    cls = ProceduralScenesDataset("train", num_samples=60, label_fraction=0.5, seed=3, target="class")
    assert (cls.classes, cls.num_classes) == (SCENE_CLASSES[1:], 4) and not (cls.has_depth or cls.has_seg)
    assert np.array_equal(cls.indices, dense.indices)  # the same scenes, labelled per image
    labels = []
    for i in range(len(cls)):
        img, label = cls[i]
        assert torch.equal(img, dense[i][0]) and isinstance(label, int)
        counts = [(dense[i][1]["mask"] == c).sum().item() for c in range(1, 5)]
        assert counts[label] == max(counts) > 0
        labels.append(label)
    assert set(labels) == {0, 1, 2, 3}
    count = ProceduralScenesDataset("train", num_samples=60, target="count")
    assert count.classes == ("1", "2", "3", "4")
    for i in range(20):  # the shapes that show at least 1% of the image, counted from the scene's layers
        scene, nearer, shown = count.scene(i), np.zeros((32, 32), dtype=bool), 0
        for _, _, footprint in reversed(scene.shapes):
            shown += (footprint & ~nearer).sum() >= 0.01 * 32 * 32
            nearer |= footprint
        assert count[i][1] == max(shown, 1) - 1
    with pytest.raises(ValueError, match="unknown scenes target 'depth'; valid: dense, class, count"):
        ProceduralScenesDataset("train", num_samples=2, target="depth")


def test_scenes_are_deterministic_per_seed_and_split():
    a, b = ProceduralScenesDataset("train", num_samples=10), ProceduralScenesDataset("train", num_samples=10)
    other_seed = ProceduralScenesDataset("train", num_samples=10, scene_seed=1)
    val = ProceduralScenesDataset("val", num_samples=10)
    for i in range(10):
        assert torch.equal(a[i][0], b[i][0])
        assert torch.equal(a[i][1]["depth"], b[i][1]["depth"]) and torch.equal(a[i][1]["mask"], b[i][1]["mask"])
    assert not any(torch.equal(a[i][0], other_seed[i][0]) for i in range(10))
    assert not any(torch.equal(a[i][0], val[i][0]) for i in range(10))
    uncached = ProceduralScenesDataset("train", num_samples=10, cache=False)
    assert torch.equal(uncached[7][1]["depth"], a[7][1]["depth"])
    a[3][1]["mask"].fill_(0)  # writing into a sample does not change the cache
    assert torch.equal(a[3][1]["mask"], b[3][1]["mask"])


def test_scenes_paint_nearer_shapes_over_farther_ones():
    ds = ProceduralScenesDataset("train", num_samples=60)
    overlaps = 0
    for i in range(len(ds)):
        s = ds.scene(i)
        shape_px = s.mask > 0
        assert (s.depth[shape_px] < s.background_depth[shape_px]).all()  # shapes stand in front of floor and wall
        assert np.array_equal(s.depth[~shape_px], s.background_depth[~shape_px])
        for j, (_, zj, fj) in enumerate(s.shapes):
            for k in range(j + 1, len(s.shapes)):  # k is nearer: shapes are listed far to near
                cls_k, zk, fk = s.shapes[k]
                assert zk <= zj
                both = fj & fk
                if both.any():
                    overlaps += 1
                    assert (s.depth[both] <= zk).all()
                    on_top = both & ~np.any([f for _, _, f in s.shapes[k + 1 :]] or [np.zeros_like(fk)], axis=0)
                    assert (s.mask[on_top] == cls_k).all() and np.allclose(s.depth[on_top], zk)
    assert overlaps >= 5  # the check above was exercised


def test_scenes_size_shrinks_with_depth_and_colour_does_not_give_the_class():
    ds = ProceduralScenesDataset("train", num_samples=150)
    z, area, colours = [], [], {c: [] for c in range(1, 5)}
    for i in range(len(ds)):
        s = ds.scene(i)
        for cls, zi, footprint in s.shapes:
            visible = (s.mask == cls) & footprint
            if footprint.sum() >= 4:
                z.append(zi)
                area.append(footprint.sum())
            if visible.sum() >= 4:
                colours[cls].append(s.image[:, visible].mean(axis=1) / 255.0)
    assert np.corrcoef(np.log(z), np.log(area))[0, 1] < -0.7
    means = np.array([np.mean(colours[c], axis=0) for c in range(1, 5)])  # (4 classes, 3 channels)
    assert np.abs(means - means.mean(axis=0)).max() < 0.08


def test_scenes_fade_towards_the_haze_with_depth():
    ds = ProceduralScenesDataset("train", num_samples=150)
    z, contrast = [], []
    for i in range(len(ds)):
        s = ds.scene(i)
        for cls, zi, footprint in s.shapes:
            visible = (s.mask == cls) & footprint & (s.depth == zi)
            if visible.sum() >= 4:
                z.append(zi)
                contrast.append(np.abs(s.image[:, visible].mean(axis=1) / 255.0 - 0.7).mean())
    assert len(z) > 100 and np.corrcoef(z, contrast)[0, 1] < -0.2


def test_scenes_stats_match_the_training_split():
    mean, std = _scene_stats(num_samples=500)
    ds = ProceduralScenesDataset("train", num_samples=1)
    assert ds.mean == pytest.approx(mean, abs=0.015) and ds.std == pytest.approx(std, abs=0.015)


def test_label_fraction_and_registry_for_dense_datasets(nyu, ade):
    assert {"nyuv2", "ade20k", "scenes"} <= set(DATASETS)
    full = build_dataset("scenes", "train", load_size=16)
    few = build_dataset("scenes", "train", load_size=16, label_fraction=0.1, seed=1)
    assert len(few) == 200 and set(few.indices.tolist()) <= set(range(2000))
    assert not np.array_equal(few.indices, build_dataset("scenes", "train", label_fraction=0.1, seed=2).indices)
    k = int(few.indices[5])
    assert torch.equal(few[5][0], full[k][0])  # the subset is drawn from the same scenes whatever its seed
    assert build_dataset("scenes", "val", scene_seed=3).scene_seed == 3
    assert len(build_dataset("nyuv2", "train", root=nyu, label_fraction=0.01)) == 1  # at least one
    assert build_dataset("ade20k", "train", root=ade, load_size=8)[0][0].shape == (3, 8, 8)
    for name, hint in (("nyuv2", "nyu_depth_v2_labeled.mat"), ("ade20k", "ADEChallengeData2016")):
        with pytest.raises(ValueError, match=f"needs data.root .*{hint}"):
            build_dataset(name, "train")


# ----------------------------------------------------------------------------------------------------------- concat


def test_dense_concat_mixes_depth_and_segmentation(nyu, ade):
    depth_only = NYUDepthV2Dataset(nyu, "train", load_size=16, segmentation=False)
    seg_only = ADE20KDataset(ade, "val", load_size=16)
    both = DenseConcat([depth_only, seg_only])
    assert len(both) == 4 and both.has_depth and both.has_seg and both.num_classes == 150
    assert both.mean == depth_only.mean and both.load_size == (16, 16) and both.max_depth == depth_only.max_depth
    batch = collate([both[i] for i in range(len(both))])
    assert batch["images"].shape == (4, 3, 16, 16) and batch["num_bad"] == 0
    assert (batch["depth"][:3] > 0).all() and (batch["mask"][:3] == 255).all()
    assert (batch["depth"][3] == 0).all() and (batch["mask"][3] == 6).all()
    scenes = DenseConcat([ProceduralScenesDataset("train", 16, 3), ProceduralScenesDataset("val", 16, 2)])
    assert len(scenes) == 5 and scenes.num_classes == 5
    with pytest.raises(ValueError, match="load_size"):
        DenseConcat([depth_only, ADE20KDataset(ade, "val", load_size=8)])


# ---------------------------------------------------------------------------------------------------------- mixture


def _mixture(nyu, ade, **changes) -> DataSettings:
    parts = [
        MixturePart("nyuv2", str(nyu), ("depth",)),
        MixturePart("ade20k", str(ade), ("segmentation",), weight=2.0),
    ]
    return DataSettings(**{"name": "mixture", "mixture": parts, "load_size": 16, "val_split": "val", **changes})


def test_mixture_gives_each_part_only_its_own_labels_at_its_weight(nyu, ade):
    train, val = build_splits(_mixture(nyu, ade))
    # NYU train: 3 samples once; ADE train: 3 pairs twice (weight 2); validation splits are not weighted
    assert len(train) == 3 + 6 and len(val) == 3 + 1
    assert train.has_depth and train.has_seg and train.num_classes == 150  # classes from the segmentation part
    nyu_part, ade_part = train.datasets
    assert isinstance(nyu_part, TaskView) and nyu_part.tasks == ("depth",) and not nyu_part.has_seg
    assert ade_part.indices.tolist() == [0, 1, 2, 0, 1, 2]
    for i in range(3):  # NYU: depth only, even where its file has segmentation labels
        _, target = train[i]
        assert (target["depth"] > 0).all() and (target["mask"] == 255).all()
    _, target = train[3]
    assert (target["depth"] == 0).all() and (target["mask"] != 255).any()
    # a part asked for labels it lacks, or a mixture that is not one, is refused with the field named
    with pytest.raises(ValueError, match="no depth labels"):
        build_splits(_mixture(nyu, ade, mixture=[MixturePart("ade20k", str(ade), ("depth",))]))
    with pytest.raises(ValueError, match="mixture must be a list of parts exactly when name is 'mixture'"):
        DataSettings(name="mixture").validate()
    with pytest.raises(ValueError, match="mixture must be"):
        DataSettings(name="scenes", mixture=[MixturePart()]).validate()
    with pytest.raises(ValueError, match="weight must be > 0"):
        MixturePart(weight=0).validate()
    with pytest.raises(ValueError, match="built from data.mixture"):
        build_dataset("mixture", "train")
    with pytest.raises(ValueError, match="options must be empty for a mixture"):
        _mixture(nyu, ade, options={"segmentation": True}).validate()
    # a single dataset takes its class's options from data.options (NYU's 894 raw classes on request)
    single = {"name": "nyuv2", "root": str(nyu), "load_size": 16}
    plain, _ = build_splits(DataSettings(**single))
    labelled, val = build_splits(DataSettings(**single, options={"segmentation": True}))
    assert not plain.has_seg and labelled.has_seg and val.has_seg and labelled.num_classes == 894


def test_mixture_sample_adds_only_to_its_own_tasks_loss(nyu, ade):
    """A depth-only sample moves only the depth loss and a segmentation-only one only the segmentation loss: each
    loss of a mixed batch equals that loss over its own part's samples alone, and gives the others no gradient."""
    train, _ = build_splits(_mixture(nyu, ade))
    batch = collate([train[i] for i in (0, 1, 3, 4)])  # 2 NYU (depth) + 2 ADE (segmentation)
    g = torch.Generator().manual_seed(0)
    depth_pred = torch.randn(4, 1, 16, 16, generator=g).add(2).requires_grad_()
    seg_logits = torch.randn(4, 150, 16, 16, generator=g).requires_grad_()
    d, s = depth_loss(depth_pred, batch["depth"]), seg_loss(seg_logits, batch["mask"])
    torch.testing.assert_close(d, depth_loss(depth_pred[:2], batch["depth"][:2]))
    torch.testing.assert_close(s, seg_loss(seg_logits[2:], batch["mask"][2:]))
    (d + s).backward()
    assert depth_pred.grad[2:].abs().sum() == 0 and depth_pred.grad[:2].abs().sum() > 0
    assert seg_logits.grad[:2].abs().sum() == 0 and seg_logits.grad[2:].abs().sum() > 0


def test_weighted_indices_repeat_and_subsample_with_a_seed():
    assert weighted_indices(5, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert sorted(weighted_indices(3, 2.0).tolist()) == [0, 0, 1, 1, 2, 2]
    quarter = weighted_indices(20, 0.25, seed=1)
    assert len(quarter) == 5 and len(set(quarter.tolist())) == 5
    assert np.array_equal(quarter, weighted_indices(20, 0.25, seed=1))
    assert not np.array_equal(quarter, weighted_indices(20, 0.25, seed=2))
    assert len(weighted_indices(10, 1.5)) == 15 and len(weighted_indices(3, 0.01)) == 1


# ----------------------------------------------------------------------------------------------------- augmentation


def _checkerboard(b: int = 8, size: int = 64, block: int = 8, seed: int = 0):
    """Images, depth and mask that all encode one block id per 8x8 block (a few blocks are ignore / no depth)."""
    grid = size // block
    ids = torch.stack(
        [torch.randperm(grid * grid, generator=torch.Generator().manual_seed(seed + i)) for i in range(b)]
    )
    ids = ids.view(b, grid, grid).repeat_interleave(block, 1).repeat_interleave(block, 2)  # (B, S, S) in 0..63
    mask = ids.clone()
    mask[ids % 9 == 0] = 255
    depth = torch.where(mask == 255, 0.0, ids.float() + 1.0)
    images = torch.stack([ids * 3, 255 - ids * 3, ids * 2 + 40], dim=1).to(torch.uint8)  # (B, 3, S, S)
    return images, depth, mask, ids


def test_joint_augment_keeps_image_depth_and_mask_aligned():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images, depth, mask, _ = _checkerboard()
    aug = JointAugment(24, train=True, mean=mean, std=std, scale=(0.25, 1.0))
    torch.manual_seed(0)
    compared = 0
    for _ in range(3):
        x, d, m = aug(images, depth, mask)
        assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32
        assert d.shape == m.shape == (8, 24, 24) and d.dtype == torch.float32 and m.dtype == torch.int64
        assert set(m.unique().tolist()) <= set(mask.unique().tolist()) and (m == 255).any()
        # nearest-sampled depth and mask agree exactly everywhere
        assert torch.equal(torch.where(m == 255, 0.0, m.float() + 1.0), d)
        # the image agrees away from block edges: where the 3x3 neighbourhood of the depth has one value (the crop is
        # larger than the output, so bilinear samples there fall inside that block; the border is never compared)
        pad = torch.nn.functional.pad(d[:, None], (1, 1, 1, 1), value=-1.0)
        win = pad.unfold(2, 3, 1).unfold(3, 3, 1).reshape(8, 24, 24, 9)
        flat = (win == d[..., None]).all(-1) & (m != 255)
        pixels = denormalize(x, mean, std) * 255
        block = m.float()
        expected = torch.stack([block * 3, 255 - block * 3, block * 2 + 40], dim=1)
        diff = (pixels - expected).abs().amax(1)
        assert diff[flat].max() < 1.5
        compared += int(flat.sum())
    assert compared > 0.1 * 3 * 8 * 24 * 24  # enough pixels were compared


def test_colour_jitter_changes_the_images_only_and_keeps_the_geometry():
    images, depth, mask, _ = _checkerboard()
    kw = {"train": True, "mean": (0.5,) * 3, "std": (0.5,) * 3, "scale": (0.25, 1.0)}
    torch.manual_seed(0)
    plain = JointAugment(24, **kw)(images, depth, mask)
    torch.manual_seed(0)
    jittered = JointAugment(24, color_jitter=(0.5, 0.5, 0.5, 0.25), **kw)(images, depth, mask)
    assert torch.equal(plain[1], jittered[1]) and torch.equal(plain[2], jittered[2])  # the same crops and flips
    assert (plain[0] - jittered[0]).abs().mean() > 0.05  # other colours
    with pytest.raises(ConfigError, match="color_jitter"):
        load_config(DataSettings, None, ["color_jitter=[0.5, 0.5, 0.5, 0.9]"])


def test_joint_augment_flips_some_samples_and_all_inputs_alike():
    images, depth, mask, ids = _checkerboard(b=16, size=32)
    aug = JointAugment(32, train=True, mean=(0.5,) * 3, std=(0.5,) * 3, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.manual_seed(1)
    _, d, m = aug(images, depth, mask)
    flipped = [torch.equal(m[i], mask[i].flip(-1)) for i in range(16)]
    same = [torch.equal(m[i], mask[i]) for i in range(16)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 0 < sum(flipped) < 16
    for i in range(16):
        assert torch.equal(d[i], depth[i].flip(-1) if flipped[i] else depth[i])


def test_joint_augment_is_reproducible_and_handles_missing_labels():
    images, depth, mask, _ = _checkerboard()
    aug = JointAugment((16, 20), train=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    state = torch.get_rng_state()
    first = aug(images, depth, mask)
    torch.set_rng_state(state)
    again = aug(images, depth, mask)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    torch.set_rng_state(state)
    x, d, m = aug(images, None, mask)
    assert d is None and torch.equal(m, first[2]) and torch.equal(x, first[0])
    x, d, m = aug(images)
    assert x.shape == (8, 3, 16, 20) and d is None and m is None
    x, d, m = aug(images[:0], depth[:0], mask[:0])
    assert x.shape == (0, 3, 16, 20) and d.shape == m.shape == (0, 16, 20)
    with pytest.raises(ValueError, match="mask"):
        aug(images, depth, mask[:, :8])


def test_joint_augment_eval_resizes_only_the_image():
    images, depth, mask, _ = _checkerboard()
    aug = JointAugment(32, train=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    state = torch.get_rng_state()
    x, d, m = aug(images, depth, mask)
    assert torch.equal(torch.get_rng_state(), state)
    assert x.shape == (8, 3, 32, 32)
    assert torch.equal(d, depth) and torch.equal(m, mask)
    same = JointAugment(64, train=False, mean=(0.5,) * 3, std=(0.5,) * 3)(images, depth, mask)[0]
    assert torch.allclose(denormalize(same, (0.5,) * 3, (0.5,) * 3), images.float() / 255, atol=1e-6)
