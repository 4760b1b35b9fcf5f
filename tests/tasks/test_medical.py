"""Volume metrics (DSC, HD95) against hand-computed values, medpy's definition and TransUNet's empty cases; the Dice
loss with the ignore index; the U-Net head's shapes, taps and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mal.models import create_encoder
from mal.models.heads import UNetHead, unet_levels, unet_taps
from mal.tasks.dense import DenseEvaluator, DenseHeadSettings, DensePredictor
from mal.tasks.medical import VolumeMetrics, case_metrics, hd95, metric_key
from mal.tasks.segmentation import dice_ce_loss, dice_loss, seg_loss

pytest.importorskip("monai")


def cube(shift: int = 0, size: int = 10, shape: tuple[int, int, int] = (20, 16, 16)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[2 + shift : 2 + shift + size, 3:13, 3:13] = True
    return m


# ------------------------------------------------------------------------------------------------------- HD95


def test_hd95_of_a_cube_shifted_by_three_voxels_is_three_times_the_spacing():
    """A 10^3 cube shifted by 3 along z: the far faces are 3 apart (every voxel of them, a fifth of the surface),
    and no surface voxel is farther from the other surface, so the 95th percentile is exactly 3 (x spacing)."""
    a, b = cube(0), cube(3)
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=(2.5, 0.7, 0.7)) == pytest.approx(7.5, rel=1e-6)
    assert hd95(a, a) == 0.0
    # in-plane spacing does not change a shift along z: the maximum is along z, in-plane paths are longer
    assert hd95(a, b, spacing=(1.0, 5.0, 5.0)) == pytest.approx(3.0)


def _medpy_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:  # noqa: ANN001
    """medpy.metric.binary.hd95, written out with scipy: border = mask minus its erosion (face connectivity),
    Euclidean distance transform of the other border's complement, 95th percentile of both directions pooled."""
    from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

    fp = generate_binary_structure(a.ndim, 1)
    ba, bb = a ^ binary_erosion(a, fp), b ^ binary_erosion(b, fp)
    d_ab = distance_transform_edt(~bb, sampling=spacing)[ba]
    d_ba = distance_transform_edt(~ba, sampling=spacing)[bb]
    return float(np.percentile(np.hstack([d_ab, d_ba]), 95))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_is_medpys_pooled_percentile_not_the_larger_directed_one(seed):
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:12, 0:24, 0:24]
    a = (z - 6) ** 2 / 20 + (y - 11) ** 2 / 40 + (x - 12) ** 2 / 30 < 1
    b = (z - 6 - rng.integers(-2, 3)) ** 2 / 16 + (y - 12) ** 2 / 60 + (x - 10) ** 2 / 25 < 1
    b[rng.integers(0, 12), rng.integers(0, 24), rng.integers(0, 24)] = True  # a stray voxel: directions differ
    spacing = (2.5, 0.8, 0.7)
    assert hd95(a, b, spacing) == pytest.approx(_medpy_hd95(a, b, spacing), rel=1e-5)


def test_hd95_rejects_empty_masks_and_bad_spacing():
    with pytest.raises(ValueError, match="non-empty"):
        hd95(cube(), np.zeros_like(cube()))
    with pytest.raises(ValueError, match="one value per axis"):
        hd95(cube(), cube(1), spacing=(1.0, 1.0))


# ------------------------------------------------------------------------------------------------ per volume


def test_case_metrics_by_hand_with_transunets_empty_cases():
    """Class 1: two cubes overlapping in 7 of 10 slices -> DSC 0.7, HD95 3; class 2: predicted, absent -> (1, 0);
    class 3: present, not predicted -> (0, 0); class 4: absent from both -> (0, 0), as calculate_metric_percase."""
    target = cube(0).astype(np.int64)
    pred = cube(3).astype(np.int64)
    target[0, 0, :3] = 3
    pred[19, 15, 15] = 2
    dsc, hd = case_metrics(pred, target, num_classes=5)
    np.testing.assert_allclose(dsc, [0.7, 1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(hd, [3.0, 0.0, 0.0, 0.0], atol=1e-6)


def test_case_metrics_ignore_index_counts_as_background():
    target = cube(0).astype(np.int64)
    pred = target.copy()
    pred[:, 0, 0] = 1  # predicted where the ground truth is unlabelled: not a false positive
    target[:, 0, 0] = 255
    dsc, hd = case_metrics(pred, target, num_classes=2)
    assert dsc[0] == pytest.approx(1.0) and hd[0] == 0.0
    with pytest.raises(ValueError, match=">= num_classes"):
        case_metrics(pred, np.full_like(target, 7), num_classes=2)


def test_perfect_volumes_give_dsc_100_and_hd95_0():
    m = VolumeMetrics(3, ("background", "kidney (L)", "liver"))
    target = torch.from_numpy(np.where(cube(0), 1, 2))  # (D, H, W): class 1 inside the cube, class 2 around it
    m.update(target.clone(), target)
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()  # (D, K, H, W)
    m.update(logits, target)
    r = m.compute()
    assert r["dsc"] == 100.0 and r["hd95"] == 0.0 and r["volumes"] == 2
    assert r["dsc_per_class"] == {"kidney (L)": 100.0, "liver": 100.0}
    assert m.flat() == {"dsc": 100.0, "hd95": 0.0, "dsc_kidney_l": 100.0, "dsc_liver": 100.0, "hd95_kidney_l": 0.0,
                        "hd95_liver": 0.0}  # fmt: skip
    assert metric_key("Kidney (R)") == "kidney_r"


def test_means_are_over_volumes_per_class_then_over_classes():
    m = VolumeMetrics(3)
    target = cube(0).astype(np.int64)
    target[:, :2] = 2  # class 2: a slab
    shifted = np.where(cube(3), 1, np.where(target == 2, 2, 0))
    m.update(torch.from_numpy(shifted), torch.from_numpy(target))  # class 1: DSC 0.7, HD95 3; class 2: perfect
    m.update(torch.from_numpy(np.where(target == 1, 0, target)), torch.from_numpy(target))  # class 1 missed: (0, 0)
    r = m.compute()
    assert r["dsc_per_class"]["class1"] == pytest.approx(35.0) and r["dsc_per_class"]["class2"] == pytest.approx(100)
    assert r["hd95_per_class"] == pytest.approx({"class1": 1.5, "class2": 0.0})
    assert r["dsc"] == pytest.approx(67.5) and r["hd95"] == pytest.approx(0.75)


def test_no_volume_gives_nan():
    r = VolumeMetrics(2).compute()
    assert math.isnan(r["dsc"]) and math.isnan(r["hd95"]) and r["volumes"] == 0


# -------------------------------------------------------------------------------------- slices -> volumes


def _slices(volume: np.ndarray, v: int, order: list[int]) -> tuple[torch.Tensor, ...]:
    t = torch.from_numpy(volume[order].astype(np.int64))
    n = len(order)
    return t, t, torch.full((n,), v), torch.tensor(order), torch.tensor([[2.0, 1.0, 1.0]] * n, dtype=torch.float64)


def test_slices_are_stacked_in_slice_order_per_volume_with_their_spacing():
    """Slices of two volumes in batches that straddle them, shuffled inside each volume: the stacked volumes give
    the same numbers as whole volumes, with the spacing of the tags (z 2: the shift of 3 slices is 6)."""
    target = cube(0).astype(np.int64)
    pred = cube(3).astype(np.int64)
    by_slices = VolumeMetrics(2)
    order = list(np.random.default_rng(0).permutation(20))
    p0, t0, v0, k0, s0 = _slices(pred, 0, order)
    _, t0, _, _, _ = _slices(target, 0, order)
    p1, t1, v1, k1, s1 = _slices(target, 1, list(range(20)))
    cat = [torch.cat(x) for x in ((p0, p1), (t0, t1), (v0, v1), (k0, k1), (s0, s1))]
    for start in range(0, 40, 7):
        by_slices.update_slices(*(x[start : start + 7] for x in cat))
    whole = VolumeMetrics(2)
    whole.update(torch.from_numpy(pred), torch.from_numpy(target), (2.0, 1.0, 1.0))
    whole.update(torch.from_numpy(target), torch.from_numpy(target), (2.0, 1.0, 1.0))
    assert by_slices.compute() == whole.compute()
    assert whole.cases[0]["hd95"][0] == pytest.approx(6.0)


def test_slices_of_a_volume_must_come_together_and_complete():
    target = cube(0).astype(np.int64)
    m = VolumeMetrics(2)
    m.update_slices(*_slices(target, 0, list(range(10))))
    m.update_slices(*_slices(target, 1, list(range(20))))
    with pytest.raises(ValueError, match="came after another volume"):
        m.update_slices(*_slices(target, 0, list(range(10, 20))))
    gap = VolumeMetrics(2)
    gap.update_slices(*_slices(target, 0, [0, 1, 3]))
    with pytest.raises(ValueError, match="missing slices"):
        gap.compute()


# --------------------------------------------------------------------------------------------------- losses


def test_dice_loss_by_hand_over_foreground_classes_of_the_batch_ignoring_255():
    """Batch Dice per foreground class, 1 - mean; ignored pixels change nothing whatever their logits."""
    logits = torch.randn(2, 3, 4, 5)
    mask = torch.randint(0, 3, (2, 4, 5))
    mask[0, 0] = 255
    p = logits.softmax(dim=1)
    valid = (mask != 255)[:, None]
    onehot = torch.nn.functional.one_hot(mask.clamp(max=2), 3).permute(0, 3, 1, 2) * valid
    inter, denom = (p * onehot * valid).sum((0, 2, 3)), (p * valid).sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    expected = 1 - ((2 * inter + 1e-5) / (denom + 1e-5))[1:].mean()
    assert dice_loss(logits, mask).item() == pytest.approx(expected.item(), rel=1e-5)
    other = logits.clone()
    other[0, :, 0] = torch.randn(3, 5) * 10
    assert dice_loss(other, mask).item() == pytest.approx(dice_loss(logits, mask).item(), rel=1e-6)
    assert dice_ce_loss(logits, mask).item() == pytest.approx((seg_loss(logits, mask) + dice_loss(logits, mask)).item())


def test_dice_loss_is_low_for_a_confident_correct_prediction_and_zero_without_labels():
    mask = torch.randint(0, 4, (2, 8, 8))
    logits = 20 * torch.nn.functional.one_hot(mask, 4).permute(0, 3, 1, 2).float()
    assert dice_loss(logits, mask).item() < 1e-4
    assert dice_loss(-logits, mask).item() > 0.99
    none = dice_loss(logits.requires_grad_(), torch.full((2, 8, 8), 255))
    assert none.item() == 0.0 and none.requires_grad


def test_head_loss_defaults_to_dice_ce_for_unet_only():
    assert DenseHeadSettings(kind="unet").seg_loss == "dice_ce"
    assert DenseHeadSettings(kind="upernet").seg_loss == "ce"
    assert DenseHeadSettings(kind="unet", loss="ce").seg_loss == "ce"
    ev = DenseEvaluator("segmentation", DenseHeadSettings(kind="unet"), 3)
    logits, mask = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    assert ev.loss({"out": logits}, mask).item() == pytest.approx(dice_ce_loss(logits, mask).item())


# -------------------------------------------------------------------------------------------------- U-Net head


@pytest.mark.parametrize(("patch", "levels"), [(16, 4), (14, 3), (8, 3), (4, 2), (2, 1), (1, 1)])
def test_unet_levels_are_the_octaves_down_to_stride_two(patch, levels):
    assert unet_levels(patch) == levels


def test_unet_taps_are_evenly_spaced_and_end_at_the_last_pair():
    assert unet_taps(12, 16) == [2, 5, 8, 11]  # UNETR's 3, 6, 9, 12
    assert unet_taps(4, 4) == [1, 3]
    assert unet_taps(24, 16) == [5, 11, 17, 23]
    assert unet_taps(2, 16) == [0, 0, 1, 1]


def test_unet_head_skips_land_at_strides_p_to_two_and_output_is_full_resolution():
    head = UNetHead(32, 7, patch_size=16, in_chans=1, channels=64)
    assert head.widths == [64, 32, 16, 16, 16]
    feats = [torch.randn(2, 32, 3, 5) for _ in range(4)]
    skips = [s(f) for s, f in zip(head.skips, feats[-2::-1], strict=True)]
    assert [tuple(s.shape[-2:]) for s in skips] == [(6, 10), (12, 20), (24, 40)]  # strides 8, 4, 2 of 48 x 80
    out = head(feats, torch.randn(2, 1, 48, 80))
    assert out["out"].shape == (2, 7, 48, 80) and out["aux"] is None
    with pytest.raises(ValueError, match="expects 4 feature grids"):
        head(feats[:3], torch.randn(2, 1, 48, 80))
    with pytest.raises(ValueError, match="does not cover"):
        head(feats, torch.randn(2, 1, 40, 80))


def test_unet_gradients_reach_every_tap_and_the_image_stem():
    head = UNetHead(16, 3, patch_size=8, channels=16)
    feats = [torch.randn(1, 16, 2, 2, requires_grad=True) for _ in range(3)]
    image = torch.randn(1, 3, 16, 16, requires_grad=True)
    head.train()(feats, image)["out"].square().sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    assert image.grad.abs().sum() > 0


@pytest.mark.parametrize(("patch", "size"), [(4, (16, 24)), (16, (32, 48)), (14, (28, 28)), (1, (6, 6))])
def test_unet_dense_predictor_for_any_patch_size_and_its_card_round_trips(patch, size):
    enc = create_encoder("mal_micro", image_size=size, patch_size=patch, dim=32, depth=4, num_heads=2, in_chans=1)
    model = DensePredictor(enc, 5, DenseHeadSettings(kind="unet", channels=16)).eval()
    x = torch.randn(2, 1, *size)
    out = model(x)["out"]
    assert out.shape == (2, 5, *size)
    card = model.mal_card()
    assert card["dense"]["head"]["kind"] == "unet"
    again = DensePredictor.from_card(card)
    again.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(again.eval()(x)["out"], out)
