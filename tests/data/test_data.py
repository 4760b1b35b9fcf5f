"""Data: digits splits, image folders with bad files, collate/bad-sample counting, batch augmentation."""

from __future__ import annotations

import hashlib
import io
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mal.data import (
    DATASETS,
    IMAGENET_MEAN,
    BadImageWarning,
    BadSampleCounter,
    BatchAugment,
    DigitsDataset,
    ImageFolderDataset,
    build_dataset,
    collate,
    denormalize,
)

# ------------------------------------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits():
    return {s: DigitsDataset(s) for s in ("train", "val", "test")}


def test_digits_splits_partition_the_data_stratified(digits):
    sizes = {s: len(d) for s, d in digits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1257, "val": 180, "test": 360}
    idx = {s: set(d.indices.tolist()) for s, d in digits.items()}
    assert not (idx["train"] & idx["val"]) and not (idx["train"] & idx["test"]) and not (idx["val"] & idx["test"])
    assert len(idx["train"] | idx["val"] | idx["test"]) == 1797
    # each split's class proportions are within 2 points of the whole's
    counts = {s: Counter(d.targets) for s, d in digits.items()}
    total = sum(counts.values(), Counter())
    for s, c in counts.items():
        for k in range(10):
            assert abs(c[k] / sizes[s] - total[k] / 1797) < 0.02, (s, k)


def test_digits_test_images_do_not_appear_in_train(digits):
    def hashes(d):
        return {hashlib.sha1(d[i][0].numpy().tobytes()).hexdigest() for i in range(len(d))}

    # a few digits are pixel-identical duplicates in load_digits itself, so allow a handful
    assert len(hashes(digits["train"]) & hashes(digits["test"])) <= 5


def test_digits_split_is_deterministic(digits):
    again = DigitsDataset("val")
    assert np.array_equal(again.indices, digits["val"].indices)
    assert torch.equal(again.images, digits["val"].images)


def test_digits_samples_shape_dtype_range_and_attributes(digits):
    d = digits["train"]
    img, label = d[0]
    assert img.shape == (1, 32, 32) and img.dtype == torch.uint8
    assert isinstance(label, int) and 0 <= label < 10
    assert d.images.max() == 255 and d.images.min() == 0
    assert (d.classes, d.num_classes, d.channels, d.load_size) == ([str(i) for i in range(10)], 10, 1, 32)
    assert d.mean == pytest.approx((0.30485,), abs=1e-3) and d.std == pytest.approx((0.32335,), abs=1e-3)
    assert digits["test"].mean == d.mean  # stats come from the train split for every split
    assert DigitsDataset("val", load_size=16)[0][0].shape == (1, 16, 16)


def test_digits_label_fraction_keeps_a_stratified_tenth(digits):
    few = DigitsDataset("train", label_fraction=0.1, seed=0)
    assert abs(len(few) - 126) <= 10
    assert set(few.targets) == set(range(10))
    assert set(few.indices.tolist()) <= set(digits["train"].indices.tolist())
    assert np.array_equal(few.indices, DigitsDataset("train", label_fraction=0.1, seed=0).indices)
    assert not np.array_equal(few.indices, DigitsDataset("train", label_fraction=0.1, seed=1).indices)
    tiny = DigitsDataset("val", subset_fraction=0.01)
    assert sorted(tiny.targets) == list(range(10))  # at least one per class


def test_digits_unknown_split():
    with pytest.raises(ValueError, match="train, val, test"):
        DigitsDataset("validation")


# ------------------------------------------------------------------------------------------------------- imagefolder


def _image(w, h, seed, fmt):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path):
    """root/train/{cat,dog}/ with 3 images each of different sizes, aspect ratios and formats."""
    sizes = [(40, 30, "PNG", "a.png"), (25, 50, "JPEG", "b.JPG"), (64, 64, "JPEG", "c.jpeg")]
    for ci, c in enumerate(["dog", "cat"]):
        d = tmp_path / "train" / c
        d.mkdir(parents=True)
        for i, (w, h, fmt, name) in enumerate(sizes):
            (d / name).write_bytes(_image(w, h, 10 * ci + i, fmt))
        (d / "notes.txt").write_text("not an image")
    return tmp_path


def test_imagefolder_shapes_labels_and_sorted_classes(tree):
    ds = ImageFolderDataset(tree, "train", load_size=24)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and ds.channels == 3
    assert ds.mean == IMAGENET_MEAN and len(ds) == 6
    assert [t for _, t in ds.samples] == [0, 0, 0, 1, 1, 1]
    assert [p.rsplit("/", 1)[-1] for p, _ in ds.samples[:3]] == ["a.png", "b.JPG", "c.jpeg"]
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.shape == (3, 24, 24) and img.dtype == torch.uint8
        assert label == ds.targets[i]


def test_imagefolder_without_split_and_with_class_to_idx(tree):
    ds = ImageFolderDataset(tree / "train", None, load_size=16, class_to_idx={"dog": 0, "cat": 1, "cow": 2})
    assert ds.classes == ["dog", "cat", "cow"] and ds.num_classes == 3
    assert ds.targets == [1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="cat"):
        ImageFolderDataset(tree, "train", class_to_idx={"dog": 0})


def test_imagefolder_center_crop_keeps_the_middle(tmp_path):
    # 60x20 image: left third red, middle green, right blue -> the 20x20 center crop is all green
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, :20, 0] = arr[:, 20:40, 1] = arr[:, 40:, 2] = 255
    (tmp_path / "x").mkdir()
    Image.fromarray(arr).save(tmp_path / "x" / "rgb.png")
    img, _ = ImageFolderDataset(tmp_path, load_size=20)[0]
    assert img[1].float().mean() > 250 and img[0].float().mean() < 5 and img[2].float().mean() < 5


@pytest.fixture
def tree_with_bad_files(tree):
    good = (tree / "train" / "cat" / "c.jpeg").read_bytes()
    (tree / "train" / "cat" / "x.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (tree / "train" / "dog" / "y.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    return tree


def test_bad_files_give_none_and_one_warning_each(tree_with_bad_files):
    ds = ImageFolderDataset(tree_with_bad_files, "train", load_size=16)
    bad = {i: p for i, (p, _) in enumerate(ds.samples) if p.endswith(("x.jpg", "y.jpg"))}
    assert len(bad) == 2
    for i, path in bad.items():
        with pytest.warns(BadImageWarning, match=path.rsplit("/", 1)[-1]):
            img, label = ds[i]
        assert img is None and label == ds.targets[i]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert ds[i][0] is None  # no second warning for the same file


def test_collate_drops_bad_samples_in_a_dataloader(tree_with_bad_files):
    ds = ImageFolderDataset(tree_with_bad_files, "train", load_size=16)
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=0, collate_fn=collate)
    with pytest.warns(BadImageWarning):
        batches = list(loader)
    assert sum(b["num_bad"] for b in batches) == 2
    assert sum(len(b["labels"]) for b in batches) == 6
    for b in batches:
        assert b["images"].dtype == torch.uint8 and b["images"].shape[1:] == (3, 16, 16)
        assert b["labels"].dtype == torch.int64 and len(b["labels"]) == len(b["images"])
    all_bad = collate([(None, 0), (None, 1)])
    assert all_bad["images"] is None and all_bad["num_bad"] == 2
    assert all_bad["labels"].dtype == torch.int64 and all_bad["labels"].shape == (0,)


def test_missing_folders_and_empty_class_name_the_path(tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found: .*nowhere"):
        ImageFolderDataset(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match="dataset folder not found: .*val"):
        ImageFolderDataset(tree, "val")
    (tree / "empty_root").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataset(tree / "empty_root")
    (tree / "train" / "emu").mkdir()
    (tree / "train" / "emu" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="class folder .*emu has no images"):
        ImageFolderDataset(tree, "train")


# --------------------------------------------------------------------------------------------------- bad-sample count


def test_bad_sample_counter_judges_the_fraction_of_the_data_not_of_the_first_batches():
    ok = BadSampleCounter(0.1)
    ok.update(90, 10)  # exactly 10%: allowed
    assert (ok.good, ok.bad) == (90, 10)
    early = BadSampleCounter(0.01, population=301)  # one corrupt file among 301 at 1%, in the very first batch
    early.update(7, 1)
    early.update(292, 0)
    early.update(7, 1)  # the second epoch reads it again: 2 of 308, under 1%
    over = BadSampleCounter(0.1, population=60)
    over.update(5, 5)  # 50% of what was read, but 5 bad files may be among 60 at 10%
    with pytest.raises(RuntimeError, match=r"7 of 17 images could not be read \(41.18%\).*max_bad_fraction=0.1"):
        over.update(5, 2)  # 7 > 10% of the 60 images: more than the data set may hold, before an epoch ends
    later = BadSampleCounter(0.1, population=20)
    later.update(36, 4)  # two epochs: 10% of what was read
    with pytest.raises(RuntimeError, match="see the warnings"):
        later.update(0, 1)
    with pytest.raises(RuntimeError, match="see the warnings"):
        BadSampleCounter(0.0, population=1000).update(10, 1)
    BadSampleCounter(0.0).update(100, 0)


def test_bad_sample_counter_state_round_trips():
    a = BadSampleCounter(0.5)
    a.update(30, 3)
    b = BadSampleCounter(0.5)
    b.load_state_dict(a.state_dict())
    assert (b.good, b.bad) == (30, 3)


# ---------------------------------------------------------------------------------------------------------- registry


def test_build_dataset(tree):
    names = ("digits", "imagefolder", "nyuv2", "ade20k", "scenes", "coco", "instances", "synapse", "volumes")
    assert set(DATASETS) == set(names)
    assert len(build_dataset("digits", "val", load_size=8)[0][0][0]) == 8
    assert build_dataset("imagefolder", "train", root=tree, load_size=12)[0][0].shape == (3, 12, 12)
    with pytest.raises(ValueError, match="digits, imagefolder"):
        build_dataset("cifar", "train")
    with pytest.raises(ValueError, match="needs data.root"):
        build_dataset("imagefolder", "train")


# ------------------------------------------------------------------------------------------------------ augmentation


def test_batch_augment_shapes_and_normalization():
    mean, std = (0.2, 0.5, 0.8), (0.1, 0.2, 0.3)
    x = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    for train in (True, False):
        out = BatchAugment(32, train=train, mean=mean, std=std)(x)
        assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    flat = (torch.tensor(mean).view(1, 3, 1, 1) * 255).round().to(torch.uint8).expand(2, 3, 32, 32)
    for train in (True, False):
        out = BatchAugment(32, train=train, mean=mean, std=std)(flat)
        assert out.abs().max() < 0.02  # one grey level off at most
    back = denormalize(BatchAugment(40, train=False, mean=mean, std=std)(x), mean, std)
    assert torch.allclose(back, x.float() / 255, atol=1e-5)


def test_batch_augment_is_reproducible_from_the_rng_state():
    aug = BatchAugment(24, train=True, mean=(0.5,), std=(0.25,))
    x = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    state = torch.get_rng_state()
    first = aug(x)
    second = aug(x)
    assert not torch.equal(first, second)
    torch.set_rng_state(state)
    assert torch.equal(aug(x), first)


def test_eval_transform_uses_no_randomness():
    aug = BatchAugment(16, train=False, mean=(0.5,), std=(0.25,))
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    state = torch.get_rng_state()
    out = aug(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(aug(x), out)


def test_deterministic_train_configuration_is_the_identity_crop():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8)
    train = BatchAugment(20, train=True, mean=mean, std=std, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    evaluate = BatchAugment(20, train=False, mean=mean, std=std)
    assert torch.equal(train(x), evaluate(x))
    assert torch.allclose(denormalize(train(x), mean, std), x.float() / 255, atol=1e-5)


def test_results_are_reported_on_the_test_split_of_the_embedded_datasets():
    from mal.data import heldout_split

    assert [heldout_split(n) for n in ("digits", "scenes", "imagefolder", "nyuv2", "ade20k")] == [
        "test", "test", "val", "val", "val"]  # fmt: skip


def test_shipped_digits_are_scikit_learns_with_the_fixed_split():
    """digits.npz (the core needs no scikit-learn) holds load_digits() and the split made from it, seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from mal.data.digits import _digits_raw, digits_split_indices

    d = load_digits()
    x, y = _digits_raw()
    assert np.array_equal(x, d.images.astype(np.float32)) and np.array_equal(y, d.target)
    idx = np.arange(len(y))
    trainval, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=0)
    train, val = train_test_split(trainval, test_size=0.125, stratify=y[trainval], random_state=0)
    split = digits_split_indices()
    for name, want in (("train", train), ("val", val), ("test", test)):
        assert np.array_equal(split[name], np.sort(want)) and split[name].dtype == np.int64


def test_figures_are_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    import mal.io
    from mal.engine.logging import save_image_grid
    from mal.tasks.depth import colorize_depth
    from mal.tasks.segmentation import colorize_mask

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(mal.io, "_warned_no_plots", False)
    rows = {"input": torch.rand(2, 3, 8, 8)}
    assert save_image_grid(rows, tmp_path / "a.png") is None and not (tmp_path / "a.png").exists()
    assert save_image_grid(rows, tmp_path / "b.png") is None
    assert capsys.readouterr().err.count('pip install "mal-vision[plots]"') == 1  # one warning per process
    depth = colorize_depth(torch.tensor([[[0.0, 1.0, 4.0]]]), max_depth=4.0)  # grey without matplotlib
    assert (
        depth.shape == (1, 3, 1, 3)
        and depth[0, :, 0, 0].tolist() == [0, 0, 0]
        and depth[0, 0, 0, 1] > depth[0, 0, 0, 2]
    )
    mask = colorize_mask(torch.tensor([[[0, 1, 255]]]), num_classes=2)
    assert torch.allclose(mask[0, :, 0, 0], torch.tensor([0x1F, 0x77, 0xB4]) / 255) and mask[0, :, 0, 2].sum() == 0
