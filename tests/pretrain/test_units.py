"""Prediction units with a meaning: ``pixel`` units predict single pixels (patch size 1, iGPT-style), and per-patch
normalized targets need patches of more than one pixel."""

from __future__ import annotations

import pytest
import torch

import mal
from mal.pretrain import MALPretrainer, ObjectiveConfig

PIXEL = dict(
    image_size=6, patch_size=1, in_chans=1, dim=16, depth=1, num_heads=2, layout={"unit": "pixel", "cluster_size": 1}
)
RAW = ObjectiveConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2, norm_pix=False)


def test_pixel_units_need_one_pixel_patches():
    with pytest.raises(ValueError, match="unit 'pixel' predicts single pixels.*patch_size=1, got 4"):
        mal.create_encoder("mal_micro", layout={"unit": "pixel", "cluster_size": 1})
    enc = mal.create_encoder("mal_micro", **PIXEL)
    assert enc.layout.num_units == 36 and enc.layout.unit_sizes.tolist() == [1] * 36


def test_per_patch_normalization_of_one_pixel_is_refused():
    enc = mal.create_encoder("mal_micro", **PIXEL)
    with pytest.raises(ValueError, match="norm_pix=false"):
        MALPretrainer(enc, ObjectiveConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2, norm_pix=True))


def test_pixel_units_predict_raw_pixels_from_earlier_pixels_only():
    torch.manual_seed(0)
    model = MALPretrainer(mal.create_encoder("mal_micro", **PIXEL), RAW).double().eval()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    out = model(x)
    assert torch.isfinite(out["loss"]) and out["pred"].shape == (2, 35, 1)
    torch.testing.assert_close(out["target"], x.flatten(1)[:, 1:, None])  # the raw pixels 1..35 in raster order
    # the prediction of pixel k is unchanged when pixels k.. change
    for k in (1, 17, 35):
        y = x.clone().flatten(1)
        y[:, k:] = torch.rand_like(y[:, k:])
        pred = model(y.view_as(x))["pred"]
        assert torch.equal(pred[:, :k], out["pred"][:, :k]), k  # query j predicts pixel j + 1
