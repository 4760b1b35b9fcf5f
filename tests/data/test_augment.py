"""The papers' augmentation recipe: crops from the full image in the loader, RandAugment, random erasing, the
evaluation resize + centre crop, and how their randomness is seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mal.config import ConfigError, from_dict
from mal.data import (
    BatchAugment,
    DataSettings,
    ImageFolderDataset,
    RandAugment,
    RandAugmentSpec,
    SampleAugment,
    build_splits,
    collate,
    loader_workers,
    random_resized_crop_box,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

# -------------------------------------------------------------------------------------------------- crops


@pytest.fixture
def wide(tmp_path):
    """root/train/x/wide.png, 400 x 100: red on the left 150 px, green in the central 100 x 100 square, blue on the
    right 150 px; the same file under val/."""
    arr = np.zeros((100, 400, 3), dtype=np.uint8)
    arr[:, :150, 0] = arr[:, 150:250, 1] = arr[:, 250:, 2] = 255
    for split in ("train", "val"):
        (tmp_path / split / "x").mkdir(parents=True)
        Image.fromarray(arr).save(tmp_path / split / "x" / "wide.png")
    return tmp_path


def test_a_training_crop_can_come_from_outside_the_central_square(wide):
    # the evaluation path squares the image first: only the green centre survives
    square, _ = ImageFolderDataset(wide, "val", load_size=32)[0]
    assert square[1].float().mean() > 240 and square[0].float().mean() < 5 and square[2].float().mean() < 5
    # the training crop is sampled on the full 400 x 100 image
    ds = ImageFolderDataset(wide, "train", transform=SampleAugment(32, scale=(0.05, 1.0), ratio=(0.75, 4 / 3)))
    assert ds.seeded_samples
    crops = [ds[(0, seed)][0] for seed in range(20)]
    assert all(c.shape == (3, 32, 32) and c.dtype == torch.uint8 for c in crops)
    red = [bool((c[0] > 200).any()) for c in crops]  # pixels from the left 150 columns
    blue = [bool((c[2] > 200).any()) for c in crops]  # ... from the right 150 columns
    assert any(red) and any(blue)
    assert any(r and not (c[1] > 200).any() for r, c in zip(red, crops, strict=True))  # wholly outside the centre


def test_crop_box_is_torchvisions_including_the_fallback():
    torch.manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(100, 400, (0.08, 1.0), (3 / 4, 4 / 3))
        assert top >= 0 and top + h <= 100 and left >= 0 and left + w <= 400
        assert 0.08 * 40000 * 0.9 <= h * w <= 40000 and 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # no box of the whole area fits a 4:1 image at ratio 1: the centre crop at the nearest allowed ratio (1)
    assert random_resized_crop_box(100, 400, (1.0, 1.0), (1.0, 1.0)) == (0, 150, 100, 100)
    assert random_resized_crop_box(400, 100, (1.0, 1.0), (0.5, 2.0)) == (100, 0, 200, 100)  # tall: ratio 1/2
    assert random_resized_crop_box(120, 100, (1.0, 1.0), (0.5, 2.0)) == (0, 0, 120, 100)  # ratio in range: all


def test_sample_crops_depend_on_the_seed_only(wide):
    ds = ImageFolderDataset(wide, "train", transform=SampleAugment(24, scale=(0.05, 1.0)))
    state = torch.get_rng_state()
    a, b = ds[(0, 7)][0], ds[(0, 7)][0]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched (num_workers=0)
    assert torch.equal(a, b) and not torch.equal(a, ds[(0, 8)][0])
    assert torch.equal(ds[0][0], ds[(0, 0)][0])  # a plain index is its own seed
    # in loader workers (another process each) the same keys give the same crops
    keys = [[(0, s) for s in range(4)], [(0, s) for s in range(4, 8)]]
    here = [b["images"] for b in DataLoader(ds, batch_sampler=keys, collate_fn=collate)]
    workers = [b["images"] for b in DataLoader(ds, batch_sampler=keys, collate_fn=collate, num_workers=2)]
    assert all(torch.equal(x, y) for x, y in zip(here, workers, strict=True))


def test_bad_files_still_give_none_with_the_training_transform(wide):
    (wide / "train" / "x" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    ds = ImageFolderDataset(wide, "train", transform=SampleAugment(16))
    with pytest.warns(UserWarning, match="could not read image"):
        img, label = ds[(0, 3)]  # bad.jpg sorts first
    assert img is None and label == 0


# ------------------------------------------------------------------------------------------------- RandAugment


def test_randaugment_notation_is_timms():
    assert RandAugmentSpec.parse("rand-m9-mstd0.5") == RandAugmentSpec(n=2, m=9.0, mstd=0.5, p=0.5)
    assert RandAugmentSpec.parse("rand-m7-n3-p1.0-inc0") == RandAugmentSpec(n=3, m=7.0, mstd=0.0, p=1.0)
    for bad, match in [("auto-m9", "timm's notation"), ("rand-m9-inc1", "inc1"), ("rand-q2", "unknown part"),
                       ("rand-m12", "m <= mmax")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            RandAugmentSpec.parse(bad)


class _Record:
    """Stands in for one kornia operation: records the magnitude it was called with."""

    def __init__(self, log: list[float]) -> None:
        self.m, self.log = 15.0, log

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.m)
        return x


def _magnitudes(spec: str, calls: int = 400) -> list[float]:
    ra, log = RandAugment(RandAugmentSpec.parse(spec)), []
    ra.ops = [_Record(log) for _ in ra.ops]
    torch.manual_seed(0)
    for _ in range(calls):
        ra(torch.zeros(1, 3, 4, 4))
    return log


def test_randaugment_draws_ops_magnitudes_and_probabilities_per_image():
    # p=1: n ops per image, at 3 x m on kornia's 0..30 scale
    assert _magnitudes("rand-m9-n2-p1", 10) == [27.0] * 20
    # mstd: a magnitude per operation ~ N(9, 0.5), clipped to [0, 10]
    m = torch.tensor(_magnitudes("rand-m9-mstd0.5-p1")) / 3
    assert len(m) == 800 and abs(float(m.mean()) - 9) < 0.1 and abs(float(m.std()) - 0.5) < 0.1
    assert float(m.max()) <= 10 and len(set(m.tolist())) > 700
    # timm's default p=0.5: about half of the 2 x 400 draws are applied
    assert 330 < len(_magnitudes("rand-m9-mstd0.5")) < 470


def test_randaugment_changes_the_crop_it_is_given(wide):
    plain = ImageFolderDataset(wide, "train", transform=SampleAugment(24, scale=(0.05, 1.0)))
    ra = ImageFolderDataset(
        wide, "train", transform=SampleAugment(24, scale=(0.05, 1.0), randaugment="rand-m9-mstd0.5")
    )
    changed = [not torch.equal(plain[(0, s)][0], ra[(0, s)][0]) for s in range(8)]
    assert sum(changed) >= 4  # 2 ops at p=0.5: a quarter of the images keep their crop
    out = ra[(0, 1)][0]
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)
    assert torch.equal(out, ra[(0, 1)][0])  # reproducible from the seed


# ------------------------------------------------------------------------------------------------- batch side


def test_random_erasing_fills_one_box_with_noise_after_normalization():
    x = torch.full((16, 3, 32, 32), 128, dtype=torch.uint8)
    kw = {"mean": MEAN, "std": STD, "crop": False, "hflip": False}
    flat = BatchAugment(32, train=True, **kw)(x)
    assert flat.abs().max() < 0.01  # the normalized constant image
    torch.manual_seed(0)
    out = BatchAugment(32, train=True, erase_prob=1.0, **kw)(x)
    erased = (out.abs() > 0.01).any(1)  # (B, H, W)
    for box in erased:
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert 0.01 < height * width / 1024 < 0.4 and int(box.sum()) == height * width  # one filled box
    noise = out.permute(1, 0, 2, 3)[:, erased]
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1  # N(0, 1) pixels
    assert torch.equal(BatchAugment(32, train=True, erase_prob=0.0, **kw)(x), flat)


def test_loader_cropped_batches_are_only_flipped():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    aug = BatchAugment(16, train=True, mean=MEAN, std=STD, crop=False)
    torch.manual_seed(1)
    out = aug(x)
    plain = BatchAugment(16, train=False, mean=MEAN, std=STD)(x)
    flipped = [torch.equal(o, p.flip(-1)) for o, p in zip(out, plain, strict=True)]
    assert all(torch.equal(o, p) or f for o, p, f in zip(out, plain, flipped, strict=True)) and any(flipped)
    with pytest.raises(ValueError, match="cropped to"):
        aug(torch.zeros(2, 3, 20, 20, dtype=torch.uint8))


def test_eval_crop_resizes_to_256_and_takes_the_centre_224():
    x = torch.randint(0, 256, (2, 3, 256, 384), dtype=torch.uint8)
    evaluate = BatchAugment(224, train=False, mean=MEAN, std=STD, eval_crop=0.875)
    out = evaluate(x)
    assert out.shape == (2, 3, 224, 224)
    # the shorter side already is 224 / 0.875 = 256: no resize, the centre 224 (rows 16.., columns 80..)
    torch.testing.assert_close(out, (x[..., 16:240, 80:304].float() / 255 - 0.5) / 0.25, rtol=0, atol=1e-5)
    # a 512 px image is resized to 256 first: a ramp shown at twice its size comes back to itself
    ramp = (torch.arange(256)[:, None] + torch.arange(256)[None]).float().div(510).expand(1, 3, 256, 256)
    big = torch.nn.functional.interpolate(ramp, scale_factor=2, mode="nearest")
    torch.testing.assert_close(evaluate(big), (ramp[..., 16:240, 16:240] - 0.5) / 0.25, rtol=0, atol=1e-4)
    # without eval_crop: the whole image resized
    assert BatchAugment(224, train=False, mean=MEAN, std=STD)(x).shape == (2, 3, 224, 224)


# ------------------------------------------------------------------------------------------------- config


def test_data_settings_check_the_recipe_options():
    def settings(**kw):
        return from_dict(DataSettings, kw)

    assert settings(name="imagefolder", randaugment="rand-m9-mstd0.5", erase_prob=0.25, eval_crop=0.875)
    for kw, match in [
        ({"randaugment": "rand-m9"}, "randaugment: must be null for dataset 'digits'"),
        ({"name": "imagefolder", "randaugment": "rand-m9-inc1"}, "randaugment: 'rand-m9-inc1': inc1"),
        ({"erase_prob": 1.5}, "erase_prob: must be in"),
        ({"eval_crop": 0.0}, "eval_crop: must be in"),
        ({"num_workers": -1}, "num_workers: must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=match):
            settings(**kw)


def test_worker_default_is_automatic_for_decoded_files_only():
    assert loader_workers(DataSettings(name="digits")) == 0
    assert loader_workers(DataSettings(name="imagefolder", num_workers=3)) == 3
    auto = loader_workers(DataSettings(name="imagefolder"))
    assert 1 <= auto <= 16 and loader_workers(DataSettings(name="imagefolder"), processes_per_node=1000) == 1


def test_build_splits_crops_the_training_split_in_the_loader(wide):
    data = DataSettings(name="imagefolder", root=str(wide), image_size=24, load_size=40, randaugment="rand-m9")
    train, val = build_splits(data)
    assert train.seeded_samples and not val.seeded_samples
    assert train.transform.size == 24 and train.transform.randaugment is not None
    assert train[(0, 0)][0].shape == (3, 24, 24) and val[0][0].shape == (3, 40, 40)
    assert math.isclose(train.transform.scale[0], data.crop_scale[0])
