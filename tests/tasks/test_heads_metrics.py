"""Dense heads (linear, UperNet) and segmentation / depth metrics checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mal
from mal.models.heads import LinearDenseHead, UperNetHead, pyramid_taps, tokens_to_grid
from mal.tasks.depth import DepthMetrics
from mal.tasks.segmentation import SegmentationMetrics
from mal.tokens import unserialize

# ----------------------------------------------------------------------------------------------
# helpers and the linear head
# ----------------------------------------------------------------------------------------------


def test_tokens_to_grid_puts_raster_token_at_its_cell():
    tokens = torch.randn(2, 15, 4)
    grid = tokens_to_grid(tokens, (3, 5))
    assert grid.shape == (2, 4, 3, 5)
    for i in range(3):
        for j in range(5):
            torch.testing.assert_close(grid[:, :, i, j], tokens[:, i * 5 + j], rtol=0, atol=0)
    with pytest.raises(ValueError, match="3x4 grid"):
        tokens_to_grid(tokens, (3, 4))


@pytest.mark.parametrize(
    ("num_pairs", "expected"),
    [(12, [3, 5, 7, 11]), (24, [7, 11, 15, 23]), (4, [0, 1, 2, 3]), (2, [0, 0, 0, 1]), (1, [0, 0, 0, 0])],
)
def test_pyramid_taps_are_spec_pairs_and_valid_for_shallow_models(num_pairs, expected):
    assert pyramid_taps(num_pairs) == expected


def test_pyramid_taps_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pyramid_taps(0)
    with pytest.raises(ValueError):
        pyramid_taps(12, fractions=(0.0, 1.0))


def test_linear_head_unpatchify_puts_token_output_at_its_pixel_block():
    # token k gets the one-hot feature e_k; weights are set so that output o of token k is 100 * k + o exactly.
    gh, gw, p, c = 3, 5, 2, 3
    dim = gh * gw
    head = LinearDenseHead(dim, p, c).double()
    # LayerNorm(e_k)[d] = (e_k[d] - 1/D) / s with s the same for every one-hot vector (biased variance + eps)
    s = math.sqrt((dim - 1) / dim**2 + head.norm.eps)
    n_out = p * p * c
    with torch.no_grad():
        head.proj.weight.copy_(100 * s * torch.arange(dim, dtype=torch.float64).expand(n_out, dim))
        head.proj.bias.copy_(100 * (dim - 1) / 2 + torch.arange(n_out, dtype=torch.float64))
    grid = torch.eye(dim, dtype=torch.float64).view(dim, gh, gw).unsqueeze(0)  # (1, D, gh, gw): e_{i*gw+j}
    out = head(grid)
    assert out.shape == (1, c, gh * p, gw * p)
    for i in range(gh):
        for j in range(gw):
            for py in range(p):
                for px in range(p):
                    for ch in range(c):
                        # patch layout (p, p, C), channel fastest: mal.tokens.patchify's convention
                        want = 100 * (i * gw + j) + (py * p + px) * c + ch
                        got = out[0, ch, i * p + py, j * p + px].item()
                        assert got == pytest.approx(want, abs=1e-9), (i, j, py, px, ch)


# ----------------------------------------------------------------------------------------------
# UperNet
# ----------------------------------------------------------------------------------------------


def _feats(b: int, dim: int, grid: tuple[int, int], requires_grad: bool = False) -> list[torch.Tensor]:
    return [torch.randn(b, dim, *grid, requires_grad=requires_grad) for _ in range(4)]


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (1, 1)])
def test_upernet_pyramid_levels_are_4x_2x_1x_half(grid):
    head = UperNetHead(16, 5, channels=16)
    levels = head.pyramid(_feats(2, 16, grid))
    gh, gw = grid
    half = (math.ceil(gh / 2), math.ceil(gw / 2))
    assert [tuple(x.shape[2:]) for x in levels] == [(4 * gh, 4 * gw), (2 * gh, 2 * gw), (gh, gw), half]
    assert all(x.shape[:2] == (2, 16) for x in levels)


@pytest.mark.parametrize("norm", ["bn", "gn"])
@pytest.mark.parametrize(("grid", "out_size"), [((4, 4), (16, 16)), ((3, 5), (12, 20)), ((3, 5), (13, 17))])
def test_upernet_output_shapes_and_aux_only_in_training(norm, grid, out_size):
    torch.manual_seed(0)
    head = UperNetHead(16, 7, channels=16, norm=norm)  # pool scale 6 exceeds every map here
    feats = _feats(2, 16, grid)
    out = head(feats, out_size)
    assert out["out"].shape == (2, 7, *out_size) and out["aux"].shape == (2, 7, *out_size)
    assert torch.isfinite(out["out"]).all() and torch.isfinite(out["aux"]).all()
    head.eval()
    with torch.no_grad():
        out = head(feats, out_size)
    assert out["out"].shape == (2, 7, *out_size) and out["aux"] is None


def test_upernet_group_norm_trains_with_batch_one():
    head = UperNetHead(16, 3, channels=16, norm="gn")
    out = head(_feats(1, 16, (3, 5)), (12, 20))
    assert out["out"].shape == (1, 3, 12, 20)


def test_upernet_gradients_reach_all_four_inputs():
    torch.manual_seed(0)
    head = UperNetHead(16, 4, channels=16, dropout=0.0)
    feats = _feats(2, 16, (3, 5), requires_grad=True)
    out = head(feats, (12, 20))
    (out["out"].square().mean() + head.aux_weight * out["aux"].square().mean()).backward()
    for i, f in enumerate(feats):
        assert f.grad is not None and f.grad.abs().sum() > 0, f"no gradient reaches feature {i}"
    # the auxiliary head reads the third feature only
    feats = _feats(2, 16, (3, 5), requires_grad=True)
    head(feats, (12, 20))["aux"].sum().backward()
    assert [f.grad is not None and bool(f.grad.abs().sum() > 0) for f in feats] == [False, False, True, False]


def test_upernet_rejects_wrong_number_or_mismatched_features():
    head = UperNetHead(16, 3, channels=16)
    with pytest.raises(ValueError, match="4 feature grids"):
        head(_feats(2, 16, (4, 4))[:3], (16, 16))
    with pytest.raises(ValueError, match="share one"):
        head([*_feats(2, 16, (4, 4))[:3], torch.randn(2, 16, 3, 5)], (16, 16))
    with pytest.raises(ValueError, match="unknown norm"):
        UperNetHead(16, 3, norm="ln")


def test_encoder_features_feed_upernet_on_a_ragged_grid():
    # the intended wiring: pyramid taps (repeats allowed) -> canonical tokens -> raster -> grids -> head
    torch.manual_seed(0)
    enc = mal.create_encoder("mal_micro", dim=16, depth=2, num_heads=2).eval()
    x = torch.randn(2, 3, 24, 40)  # 6x10 patch grid, not the configured 8x8
    grid = (6, 10)
    taps = pyramid_taps(enc.num_layers)
    _, feats = enc.forward_intermediates(x, taps)  # one output per distinct pair, in pair order
    by_pair = dict(zip(sorted(set(taps)), feats, strict=True))
    order = enc.layout_for(grid).order
    grids = [tokens_to_grid(unserialize(by_pair[t], order), grid) for t in taps]
    head = UperNetHead(16, 5, channels=16).eval()
    with torch.no_grad():
        out = head(grids, (24, 40))
    assert out["out"].shape == (2, 5, 24, 40)


# ----------------------------------------------------------------------------------------------
# segmentation metrics
# ----------------------------------------------------------------------------------------------

# 2x3 image, 4 classes; pixel (1, 1) is ignored (and predicted as class 2, which appears nowhere else).
SEG_TARGET = torch.tensor([[[0, 0, 1], [1, 255, 0]]])
SEG_PRED = torch.tensor([[[0, 3, 1], [1, 2, 1]]])
# By hand over the 5 labelled pixels: correct at (0,0), (0,2), (1,0) -> pixel acc 3/5.
#   class 0: TP 1, GT 3, pred 1 -> union 3 -> IoU 1/3
#   class 1: TP 2, GT 2, pred 3 -> union 3 -> IoU 2/3
#   class 2: only predicted at the ignored pixel -> union 0 -> nan (left out of the mean)
#   class 3: predicted once, never labelled -> union 1 -> IoU 0 (counts in the mean)
SEG_IOU = [100 / 3, 200 / 3, math.nan, 0.0]
SEG_MIOU = 100 * (1 / 3 + 2 / 3 + 0) / 3
SEG_ACC = 60.0


def _check_seg(result: dict) -> None:
    assert result["pixel_acc"] == pytest.approx(SEG_ACC, rel=1e-12)
    assert result["miou"] == pytest.approx(SEG_MIOU, rel=1e-12)
    assert len(result["iou_per_class"]) == 4
    for got, want in zip(result["iou_per_class"], SEG_IOU, strict=True):
        assert got == pytest.approx(want, rel=1e-12, nan_ok=True)


def test_segmentation_metrics_match_hand_computation_with_ignore_and_absent_class():
    metric = SegmentationMetrics(4)
    metric.update(SEG_PRED, SEG_TARGET)
    _check_seg(metric.compute())


def test_segmentation_metrics_accept_logits_and_accumulate_over_batches():
    metric = SegmentationMetrics(4)
    logits = F.one_hot(SEG_PRED, 4).permute(0, 3, 1, 2).float()  # (1, 4, 2, 3), argmax = SEG_PRED
    for r in range(2):  # one image row per update: the dataset-wide confusion matrix is the same
        metric.update(logits[:, :, r : r + 1], SEG_TARGET[:, r : r + 1])
    _check_seg(metric.compute())
    metric.reset()
    metric.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    result = metric.compute()
    assert result["miou"] == pytest.approx(100.0) and result["pixel_acc"] == pytest.approx(100.0)
    assert result["iou_per_class"][0] == pytest.approx(100.0) and all(
        math.isnan(v) for v in result["iou_per_class"][1:]
    )


def test_segmentation_metrics_reject_mismatched_shapes():
    metric = SegmentationMetrics(4)
    with pytest.raises(ValueError):
        metric.update(torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="classes"):
        metric.update(torch.zeros(1, 5, 2, 3), SEG_TARGET)


# ----------------------------------------------------------------------------------------------
# depth metrics
# ----------------------------------------------------------------------------------------------


def _depth_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # image A: gt 0 is invalid; valid pairs (pred, gt) = (1, 1), (3, 2), (2, 4)
    #   rmse sqrt((0 + 1 + 4) / 3), abs_rel (0 + 1/2 + 2/4) / 3 = 1/3, ratios 1, 1.5, 2 -> delta1 1/3
    # image B: all valid, pred 0 is clamped to 1e-3; pairs (2, 2), (2.2, 2), (0.001, 2), (2, 2)
    #   rmse sqrt((0 + 0.04 + 1.999^2 + 0) / 4), abs_rel (0 + 0.1 + 0.9995 + 0) / 4, ratios 1, 1.1, 2000, 1 -> 3/4
    # image C: no valid pixel -> skipped
    pred = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.2], [0.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]])
    gt = torch.tensor([[[1.0, 2.0], [4.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]])
    return pred, gt


def test_depth_metrics_match_hand_computation_averaged_over_images():
    pred, gt = _depth_batch()
    metric = DepthMetrics()
    metric.update(pred, gt)
    result = metric.compute()
    rmse_a, rmse_b = math.sqrt(5 / 3), math.sqrt((0.04 + 1.999**2) / 4)
    assert result["rmse"] == pytest.approx((rmse_a + rmse_b) / 2, rel=1e-6)
    assert result["abs_rel"] == pytest.approx((1 / 3 + 1.0995 / 4) / 2, rel=1e-6)
    assert result["delta1"] == pytest.approx(100 * (1 / 3 + 3 / 4) / 2, rel=1e-6)
    # same numbers from (B, 1, H, W) inputs fed one image at a time
    metric.reset()
    for i in range(3):
        metric.update(pred[i : i + 1, None], gt[i : i + 1, None])
    assert metric.compute() == pytest.approx(result, rel=1e-6)


def test_depth_metrics_max_depth_masks_targets_and_clamps_predictions():
    # image A with max_depth 3: gt 4 leaves the mask, pred 3.5 is clamped to 3
    #   valid pairs (1, 1), (3, 2) -> rmse sqrt(1/2), abs_rel (0 + 1/2) / 2, delta1 1/2
    pred = torch.tensor([[[1.0, 3.5], [2.0, 5.0]]])
    gt = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])
    metric = DepthMetrics(max_depth=3.0)
    metric.update(pred, gt)
    result = metric.compute()
    assert result == pytest.approx({"rmse": math.sqrt(0.5), "abs_rel": 0.25, "delta1": 50.0}, rel=1e-6)


def test_depth_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError):
        DepthMetrics().update(torch.ones(1, 2, 2), torch.ones(1, 2, 3))
