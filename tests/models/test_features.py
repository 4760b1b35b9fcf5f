"""Encoders as dense-prediction backbones: feature maps of chosen layers (``features_only``) at any input size, and
ViTDet's simple feature pyramid (strides 4 to 64)."""

from __future__ import annotations

import pytest
import torch

import mal
from mal.models import FeatureEncoder, PyramidBackbone, SimpleFeaturePyramid, create_encoder, create_model, save_model

SMALL = {"dim": 32, "depth": 2, "num_heads": 2}


@pytest.mark.parametrize("name", ["mal_micro", "vit_micro", "vim_micro", "arm_micro"])
def test_feature_maps_are_the_classifiers_intermediates_in_raster_order(name):
    torch.manual_seed(0)
    small = {k: v for k, v in SMALL.items() if k != "num_heads" or not name.startswith(("vim", "arm"))}
    model = create_model(name, num_classes=0, **small).eval()
    features = FeatureEncoder(model.encoder, (0, -1)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inner, last = features(x)
        ref = model.forward_intermediates(x, [0, 1], norm=True, intermediates_only=True)
        plain = model.forward_intermediates(x, [0], intermediates_only=True)[0]
    assert inner.shape == last.shape == (2, 32, 8, 8)
    torch.testing.assert_close(inner, plain)  # an inner layer as it leaves the layer
    torch.testing.assert_close(last, ref[1])  # the last after the final norm
    assert features.feature_info == [{"num_chs": 32, "reduction": 4, "module": "encoder.blocks.0"},
                                     {"num_chs": 32, "reduction": 4, "module": "encoder.blocks.1"}]  # fmt: skip


def test_any_input_size_is_padded_to_patches_and_keeps_the_pretraining_cluster_grid():
    encoder = create_encoder("mal_micro", **SMALL)  # built at 32 px: an 8x8 grid in 4x4 clusters of 2x2 patches
    built = encoder.layout_for((8, 8)).cluster_grid
    features = FeatureEncoder(encoder).eval()
    with torch.no_grad():
        (out,) = features(torch.randn(1, 3, 46, 61))  # neither a multiple of the patch nor square
    assert out.shape == (1, 32, 12, 16)  # ceil(46 / 4), ceil(61 / 4)
    assert encoder.layout_for((12, 16)).cluster_grid == built == (4, 4)


def test_features_only_from_a_name_or_a_folder_of_weights(tmp_path):
    torch.manual_seed(0)
    folder = save_model(create_model("mal_micro", num_classes=10, **SMALL), tmp_path / "m")
    a = mal.create_model(str(folder), features_only=True, out_indices=2).eval()
    b = mal.create_model(None, pretrained=folder, features_only=True, out_indices=(-2, -1)).eval()
    x = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        for fa, fb in zip(a(x), b(x), strict=True):
            torch.testing.assert_close(fa, fb)
    with pytest.raises(ValueError, match="out_indices"):
        mal.create_model("mal_micro", features_only=True, out_indices=(5,), **SMALL)


def test_the_simple_pyramid_gives_strides_4_to_64_at_detection_sizes():
    encoder = create_encoder("vil_micro", patch_size=16, image_size=224, dim=32, depth=1, num_heads=2)
    backbone = PyramidBackbone(encoder, out_channels=24).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 800, 1333))  # the longer side padded to 1344 = 84 patches
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"0": (1, 24, 200, 336), "1": (1, 24, 100, 168), "2": (1, 24, 50, 84), "3": (1, 24, 25, 42),
                      "pool": (1, 24, 13, 21)}  # fmt: skip
    assert backbone.out_channels == 24 and all(
        n.startswith(("encoder.", "neck.")) for n, _ in backbone.named_parameters()
    )


def test_pyramid_levels_from_a_small_patch_pool_instead_of_upsampling():
    pyramid = SimpleFeaturePyramid(16, 4, out_channels=8)  # a 4 px patch: stride 4 is the map itself
    out = pyramid(torch.randn(2, 16, 16, 12))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(16, 12), (8, 6), (4, 3), (2, 2), (1, 1)]
    assert isinstance(pyramid.levels[0][0], torch.nn.Identity)
    with pytest.raises(ValueError, match="not the patch size 4 times a power of two"):
        SimpleFeaturePyramid(16, 4, strides=(6,))
