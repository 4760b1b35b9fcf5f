"""Image files beyond 8-bit RGB: 16-bit and float files keep their value range through the reader, the per-sample
crop, the collate and a pretraining run; single-channel data stays single-channel; what cannot be represented is
refused in one line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, png16
from mal.data import BadImageWarning, ImageFolderDataset, SampleAugment, collate
from mal.data.ade20k import load_image_and_mask
from mal.data.common import (
    IMAGENET_MEAN,
    UnsupportedImageError,
    ValueRangeWarning,
    read_image,
    resize_dense,
)


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _ramp16(h: int = 24, w: int = 32, lo: int = 1000, hi: int = 60000) -> np.ndarray:
    """uint16 ``(H, W)``: a smooth diagonal ramp from ``lo`` to ``hi``, every pixel a different value."""
    y, x = np.mgrid[0:h, 0:w]
    return np.round(lo + (hi - lo) * (x + y * w) / (h * w - 1)).astype(np.uint16)


# ------------------------------------------------------------------------------------------------------------ reader


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1", "CMYK"])
def test_8bit_modes_stay_uint8_and_are_pils_conversions(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.fromarray(rgb).convert(mode).save(path)
    with Image.open(path) as img:
        want_rgb, want_l = np.asarray(img.convert("RGB")), np.asarray(img.convert("L"))
    x, x1 = read_image(path), read_image(path, channels=1)
    assert x.dtype == x1.dtype == torch.uint8 and x.shape == (3, 12, 10) and x1.shape == (1, 12, 10)
    assert np.array_equal(x.permute(1, 2, 0).numpy(), want_rgb)
    assert np.array_equal(x1[0].numpy(), want_l)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".pgm"])  # PIL modes I;16 (PNG, TIFF) and I (16-bit PGM)
def test_16bit_grayscale_keeps_its_range_and_precision(tmp_path, suffix):
    raw = _ramp16()
    path = _save(tmp_path / f"x{suffix}", raw)
    x = read_image(path, channels=1)
    assert x.dtype == torch.float32 and x.shape == (1, 24, 32)
    assert torch.allclose(x[0], torch.from_numpy(raw / 65535.0).float(), rtol=0, atol=1e-7)
    assert 0.015 < float(x.min()) < 0.016 and 0.91 < float(x.max()) < 0.92  # not saturated, not clipped
    assert len(torch.unique(x)) == raw.size > 256  # not quantized to 8 bits


def test_float_tiff_values_are_kept(tmp_path):
    raw = np.linspace(0.0, 1.0, 60, dtype=np.float32).reshape(6, 10) ** 3  # values 8 bits could not hold
    x = read_image(_save(tmp_path / "x.tif", raw), channels=1)
    assert x.dtype == torch.float32 and torch.equal(x[0], torch.from_numpy(raw))


def test_value_range_maps_raw_values_without_clipping(tmp_path):
    hu = np.array([[-1024, -1000, 0, 400, 3000]], dtype=np.int16)  # CT in Hounsfield units (stored as 32-bit TIFF)
    ct = _save(tmp_path / "ct.tif", hu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a value_range asked for these values: no warning
        x = read_image(ct, channels=1, value_range=(-1000, 400))
    assert torch.allclose(x[0], torch.from_numpy((hu + 1000) / 1400.0).float(), atol=1e-6)
    assert float(x.min()) < 0 and float(x.max()) > 2  # outside the window, not clipped
    # integer files are mapped from their raw values, not from the 0..1 they would get by default
    raw = np.array([[0, 2048, 4095, 8190]], dtype=np.uint16)
    x = read_image(_save(tmp_path / "twelve_bits.png", raw), channels=1, value_range=(0, 4095))
    assert torch.allclose(x[0], torch.tensor([0.0, 2048 / 4095, 1.0, 2.0]))
    with pytest.raises(ValueError, match="lo < hi"):
        read_image(ct, channels=1, value_range=(400, -1000))


def test_float_values_outside_unit_range_are_warned_once_per_dataset(tmp_path):
    for i in range(3):
        _save(tmp_path / "train" / "a" / f"depth{i}.tif", np.full((8, 8), 100.0 * (i + 1), np.float32))
    ds = ImageFolderDataset(tmp_path, "train", load_size=8, channels=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [ds[i][0] for i in range(len(ds))]
    assert [float(s.max()) for s in samples] == [100.0, 200.0, 300.0]  # kept, only warned about
    (w,) = [w for w in caught if issubclass(w.category, ValueRangeWarning)]
    msg = str(w.message)
    assert "\n" not in msg and str(tmp_path / "train" / "a" / "depth0.tif") in msg
    assert "[100, 100]" in msg and "data.options.value_range=[lo, hi]" in msg
    # in range: no warning
    _save(tmp_path / "ok" / "a" / "x.tif", np.full((8, 8), 0.5, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageFolderDataset(tmp_path, "ok", load_size=8, channels=1)[0]


def test_channels_1_keeps_one_channel_and_3_replicates(tmp_path):
    raw = _ramp16()
    path = _save(tmp_path / "x.png", raw)
    one, three = read_image(path, channels=1), read_image(path, channels=3)
    assert one.shape == (1, 24, 32) and three.shape == (3, 24, 32)
    assert all(torch.equal(three[c], one[0]) for c in range(3))
    rgb = _save(tmp_path / "c.png", np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8))
    assert np.array_equal(read_image(rgb, channels=1)[0].numpy(), np.asarray(Image.open(rgb).convert("L")))
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        read_image(path, channels=2)


def test_16bit_colour_png_is_refused_in_one_line_not_counted_as_bad(tmp_path):
    rgb16 = np.random.default_rng(0).integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    path = png16(tmp_path / "train" / "a" / "colour16.png", rgb16)
    with Image.open(path) as img:  # what the refusal guards against: PIL reads it as 8-bit, without a word
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), (rgb16 >> 8).astype(np.uint8))
    (tmp_path / "train" / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = ImageFolderDataset(tmp_path, "train", load_size=8)
    assert [Path(p).name for p, _ in ds.samples] == ["colour16.png", "corrupt.png"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnsupportedImageError) as err:
            ds[0]
        assert ds[1] == (None, 0)  # a corrupt file is still skipped with a warning
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    assert str(path) in msg and "RGB;16B" in msg and "16-bit grayscale" in msg
    assert [w.category for w in caught] == [BadImageWarning] and "corrupt.png" in str(caught[0].message)
    # 16-bit gray + alpha is read as 8-bit RGBA by PIL: refused too
    with pytest.raises(UnsupportedImageError, match="LA;16B"):
        read_image(png16(tmp_path / "gray_alpha16.png", rgb16[..., :2]), channels=1)


def test_16bit_gray_png_written_by_hand_reads_back_exactly(tmp_path):
    # the writer of the refused colour PNGs above writes real PNGs: its grayscale ones read back as PIL's own
    raw = _ramp16(5, 7)
    x = read_image(png16(tmp_path / "g.png", raw[..., None]), channels=1)
    assert torch.allclose(x[0], torch.from_numpy(raw / 65535.0).float(), rtol=0, atol=1e-7)
    assert torch.equal(x, read_image(_save(tmp_path / "pil.png", raw), channels=1))


# --------------------------------------------------------------------------------------------- batches and crops


def test_a_batch_mixing_8bit_and_16bit_files_is_float_in_unit_range(tmp_path):
    gray8 = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    _save(tmp_path / "val" / "a" / "eight.png", gray8)
    _save(tmp_path / "val" / "a" / "sixteen.png", _ramp16(16, 16))
    ds = ImageFolderDataset(tmp_path, "val", load_size=16)
    assert ds[0][0].dtype == torch.uint8 and ds[1][0].dtype == torch.float32
    batch = collate([ds[0], ds[1], (None, 0)])
    images = batch["images"]
    assert images.dtype == torch.float32 and images.shape == (2, 3, 16, 16) and batch["num_bad"] == 1
    assert torch.equal(images[0], torch.from_numpy(gray8).float().div(255).expand(3, -1, -1))
    assert torch.allclose(images[1, 0], torch.from_numpy(_ramp16(16, 16) / 65535.0).float(), atol=1e-7)
    assert collate([ds[0], ds[0]])["images"].dtype == torch.uint8  # all 8-bit: as before


def test_sample_augment_crops_float_images_in_float_with_the_8bit_draws(tmp_path):
    raw16 = _ramp16(40, 60)
    raw8 = np.round(raw16 / 257.0).astype(np.uint8)  # the same picture at 8 bits
    x16 = read_image(_save(tmp_path / "x16.png", raw16), channels=1)
    x8 = read_image(_save(tmp_path / "x8.png", raw8), channels=1)
    aug = SampleAugment(16, scale=(0.1, 1.0))
    for seed in range(5):
        a16, a8 = aug(x16, seed), aug(x8, seed)
        assert a16.dtype == torch.float32 and a16.shape == (1, 16, 16) and a8.dtype == torch.uint8
        assert torch.equal(a16, aug(x16, seed))  # a function of (image, seed)
        # the same crop box: the float crop is the 8-bit one up to 8-bit rounding
        assert (a16 - a8.float() / 255).abs().max() < 1.5 / 255
        # a smooth ramp resamples within its own range: 16-bit values are kept, not clipped or quantized
        assert float(x16.min()) - 1e-3 <= float(a16.min()) and float(a16.max()) <= float(x16.max()) + 1e-3
        assert len(torch.unique(a16)) > len(torch.unique(a8))
    assert not torch.equal(aug(x16, 0), aug(x16, 1))
    # values outside [0, 1] stay so through the crop
    assert float(aug(x16 * 4 - 1, 0).max()) > 2


def test_randaugment_on_float_and_single_channel_images(tmp_path):
    x16 = read_image(_save(tmp_path / "x16.png", _ramp16(40, 60)), channels=1)
    aug = SampleAugment(16, scale=(0.1, 1.0), randaugment="rand-m9-mstd0.5-p1.0")
    out = [aug(x16, seed) for seed in range(6)]
    assert all(o.dtype == torch.float32 and o.shape == (1, 16, 16) for o in out)
    assert all(float(o.min()) >= 0 and float(o.max()) <= 1 for o in out)
    assert torch.equal(out[0], aug(x16, 0))
    assert any(((o * 255) - (o * 255).round()).abs().max() > 0.01 for o in out)  # not rounded to 8 bits
    # a single 8-bit channel goes through every operation (kornia's colour op needs three channels)
    gray8 = read_image(_save(tmp_path / "x8.png", np.round(_ramp16(40, 60) / 257.0).astype(np.uint8)), channels=1)
    assert all(aug(gray8, seed).shape == (1, 16, 16) for seed in range(20))
    # float values RandAugment would clip are refused in one line, pointing at the fix
    with pytest.raises(ValueError, match=r"value_range") as err:
        aug(x16 * 1000, 0)
    assert "\n" not in str(err.value)


def test_imagefolder_of_16bit_single_channel_pngs(tmp_path):
    for split in ("train", "val"):
        for i in range(2):
            _save(tmp_path / split / "a" / f"{i}.png", _ramp16(24 + 8 * i, 32))
    train = ImageFolderDataset(tmp_path, "train", channels=1, transform=SampleAugment(12, scale=(0.2, 1.0)))
    val = ImageFolderDataset(tmp_path, "val", load_size=12, channels=1)
    assert train.channels == val.channels == 1
    assert val.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,)) and len(val.std) == 1
    for ds, key in ((train, (0, 7)), (val, 0)):
        img, label = ds[key]
        assert img.dtype == torch.float32 and img.shape == (1, 12, 12) and label == 0
        assert float(img.min()) > 0.015 and float(img.max()) < 0.92 and len(torch.unique(img)) > 1
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        ImageFolderDataset(tmp_path, "val", channels=4)


def test_pretraining_on_16bit_single_channel_pngs_builds_a_one_channel_model(tmp_path):
    from mal.pretrain.task import load_pretrain_config, pretrain

    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            for i in range(4):
                _save(root / split / c / f"{i}.png", _ramp16(20, 24 + i, lo=1000 + 500 * i))
    cfg = load_pretrain_config(None, [*TINY, "data.name=imagefolder", f"data.root={root}", "data.num_workers=0",
                                      "data.options={channels: 1}", "optim.max_steps=2", "optim.batch_size=4",
                                      f"run.out_dir={tmp_path / 'r'}"])  # fmt: skip
    result = pretrain(cfg)
    assert result.step == 2 and np.isfinite(result.train_loss)
    saved = json.loads((Path(result.checkpoint) / "config.json").read_text())
    assert saved["config"]["in_chans"] == 1


# ------------------------------------------------------------------------------------------------------------ dense


def test_dense_images_keep_float_through_loading_and_resizing(tmp_path):
    image = _save(tmp_path / "x.png", _ramp16(20, 30))
    mask = _save(tmp_path / "m.png", np.ones((20, 30), np.uint8))
    x, ann = load_image_and_mask(str(image), str(mask), (10, 10))
    assert x.dtype == torch.float32 and x.shape == (3, 10, 10) and ann.shape == (10, 10)
    assert float(x.min()) > 0.015 and float(x.max()) < 0.92
    big = torch.full((3, 8, 8), 2.5)  # out of [0, 1]: neither rounded to uint8 nor clipped
    out, _, _ = resize_dense(big, torch.zeros(8, 8), torch.zeros(8, 8, dtype=torch.int64), (4, 4))
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full((3, 4, 4), 2.5))
