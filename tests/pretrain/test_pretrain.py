"""The autoregressive objective: decoder masks, targets, loss, reconstruction and the no-leak invariant."""

from __future__ import annotations

import pytest
import torch

import mal
from helpers import with_layout
from mal.pretrain import MALPretrainer, ObjectiveConfig, decoder_masks, normalize_patches, sincos_pos_embed_2d
from mal.pretrain.decoder import tap_pairs, tap_schedule
from mal.tokens import patchify, serialize

SMALL_DECODER = ObjectiveConfig(decoder_dim=32, decoder_depth=2, decoder_heads=4)
#: MAL-v2 Table 13: every decoder kind passes the same no-leak tests
DECODERS = ("transformer", "mlstm", "mamba", "paper")


def small_decoder(kind: str) -> ObjectiveConfig:
    return ObjectiveConfig(decoder=kind, decoder_dim=32, decoder_depth=2, decoder_heads=4)


def make(**enc_overrides) -> MALPretrainer:
    objective = enc_overrides.pop("objective", SMALL_DECODER)
    torch.manual_seed(0)
    enc_overrides.setdefault("image_size", 16)
    model = enc_overrides.pop("model", "mal_micro")
    if model.startswith("vit"):
        enc_overrides.setdefault("num_heads", 2)
    enc = mal.create_encoder(model, in_chans=1, dim=32, depth=2, **with_layout(enc_overrides))
    return MALPretrainer(enc, objective).double().eval()


def test_decoder_masks_by_hand():
    # 4 clusters of 2 tokens; queries for clusters 1..3 (sequence positions 2..7)
    units = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]])
    self_mask, cross_mask = decoder_masks(units[:, 2:], units)
    expected_self = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    expected_cross = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(self_mask[0], expected_self)
    assert torch.equal(cross_mask[0], expected_cross)
    # a first-unit query (ragged random batches) may read unit 0 only, so its row is never empty
    _, cross0 = decoder_masks(units[:, :1], units)
    assert cross0[0, 0].tolist() == [True, True, False, False, False, False, False, False]


def test_sincos_pos_embed():
    e = sincos_pos_embed_2d(8, 2, 3)
    assert e.shape == (6, 8)
    # raster index 0 = (row 0, col 0): sin 0 = 0, cos 0 = 1 in both halves
    assert e[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    # index 4 = (row 1, col 1): the row and column halves agree
    assert torch.equal(e[4, :4], e[4, 4:])
    assert torch.allclose(e[1, 4:], torch.tensor([0.8414710, 0.0099998, 0.5403023, 0.99995]), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 2, 2)


def test_tap_pairs():
    assert tap_pairs(12) == [5, 7, 9, 11]  # pairs 6, 8, 10, 12 of 12
    assert tap_pairs(4) == [1, 2, 2, 3]
    assert tap_schedule(12, 8) == ([5, 7, 9, 11], [0, 0, 1, 1, 2, 2, 3, 3])
    assert tap_schedule(12, 2) == ([5, 9], [0, 1])  # a shallow decoder uses taps 0 and 2 only


def test_targets_and_loss_by_hand():
    m = make()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    out = m(x)
    scan, pos = out["scan"], out["positions"]
    assert pos.shape == (2, 16 - 4)  # 4x4 grid, clusters of 2x2: the first cluster is never predicted
    raw = serialize(patchify(x, 4), scan.order)[:, 4:]
    mean, var = raw.mean(-1, keepdim=True), raw.var(-1, keepdim=True, unbiased=True)
    assert torch.allclose(out["target"], (raw - mean) / (var + 1e-6).sqrt())
    assert torch.allclose(out["loss"], ((out["pred"] - out["target"]) ** 2).mean())
    m.cfg.norm_pix = False
    assert torch.equal(m(x)["target"], raw)


def test_normalize_patches_statistics():
    t = normalize_patches(torch.randn(3, 5, 48, dtype=torch.float64) * 7 + 2)
    assert torch.allclose(t.mean(-1), torch.zeros(3, 5, dtype=t.dtype), atol=1e-12)
    assert torch.allclose(t.var(-1), torch.ones(3, 5, dtype=t.dtype), atol=1e-6)


def test_reconstruct_perfect_prediction_gives_the_image():
    m = make()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    out = m(x)
    out["pred"] = out["target"].clone()
    rec = m.reconstruct(x, out)
    assert torch.allclose(rec["prediction"], x, atol=1e-5)
    ctx = rec["context"]
    assert ctx[:, :, :8, :8].abs().sum() > 0
    assert ctx[:, :, 8:, :].abs().sum() == 0 and ctx[:, :, :, 8:].abs().sum() == 0  # only cluster 0 is context


CASES = {
    "row": dict(),
    "column-ragged": dict(cluster_order="column", image_size=20),  # 5x5 grid, clusters 2,2,1
    "random-ragged": dict(cluster_order="random", image_size=20),
    "taps": dict(objective=ObjectiveConfig(decoder_dim=32, decoder_depth=3, decoder_heads=4, memory="taps")),
    "causal-within": dict(within_cluster="causal"),
    "patch-span": dict(cluster_size=1, unit="patch-span", span=3, image_size=16),
    # the ViT baseline with the same block-causal layout (MAL-v2 Table 4)
    "vit": dict(model="vit_micro"),
    "vit-random-ragged": dict(model="vit_micro", cluster_order="random", image_size=20),
    "vit-causal-within": dict(model="vit_micro", within_cluster="causal"),
    # the Mamba baselines (MAL-v2 Table 4, the ARM paper): causal token by token
    "vim": dict(model="vim_micro"),
    "arm-random-ragged": dict(model="arm_micro", cluster_order="random", image_size=20),
}


# the recurrent decoders read the last block only: the taps case is the Transformer decoder's
LEAK_CASES = [(c, d) for c in CASES for d in DECODERS if d == "transformer" or "objective" not in CASES[c]]


@pytest.mark.parametrize(("case", "decoder"), LEAK_CASES)
def test_no_leak_prediction_of_unit_k_ignores_units_from_k_on(case, decoder):
    overrides = {"objective": small_decoder(decoder), **CASES[case]}
    size = overrides.setdefault("image_size", 16)
    m = make(**overrides)
    x = torch.randn(2, 1, size, size, dtype=torch.float64)
    scan = m.draw_scan(x, generator=torch.Generator().manual_seed(1))
    out = m(x, scan=scan)
    q_units = scan.unit_ids.gather(1, out["positions"])  # (B, Lq)
    num_units = int(scan.unit_ids.max()) + 1
    p = m.patch_size
    gw = size // p
    for k in range(1, num_units):
        y = x.clone()
        for b in range(x.shape[0]):  # new pixels in every patch of units >= k
            for raster in scan.order[b][scan.unit_ids[b] >= k].tolist():
                r, c = divmod(raster, gw)
                y[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p] = torch.randn(1, p, p, dtype=y.dtype)
        pred_y = m(y, scan=scan)["pred"]
        keep = q_units <= k
        assert torch.equal(out["pred"][keep], pred_y[keep]), f"unit {k} prediction changed"
        assert not torch.equal(out["pred"][~keep], pred_y[~keep]) or not (~keep).any()


@pytest.mark.parametrize("decoder", DECODERS)
def test_no_leak_gradients(decoder):
    m = make(cluster_order="random", image_size=20, objective=small_decoder(decoder))
    x = torch.randn(2, 1, 20, 20, dtype=torch.float64, requires_grad=True)
    scan = m.draw_scan(x, generator=torch.Generator().manual_seed(3))
    out = m(x, scan=scan)
    q_units = scan.unit_ids.gather(1, out["positions"])
    k = 2
    (out["pred"] * (q_units <= k)[..., None]).sum().backward()
    grad_patches = serialize(patchify(x.grad, m.patch_size), scan.order).abs().sum(-1)  # (B, L)
    assert (grad_patches[scan.unit_ids >= k] == 0).all()
    assert (grad_patches[scan.unit_ids < k] > 0).all()


def test_objective_trains_in_float32_and_backward_reaches_every_parameter():
    m = make(objective=ObjectiveConfig(decoder_dim=32, decoder_depth=2, decoder_heads=4, memory="taps")).float()
    m.train()
    out = m(torch.randn(2, 1, 16, 16))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert missing == []
    assert "decoder.query_token" in m.no_weight_decay()


def test_wrong_image_size_is_a_clear_error():
    m = make()
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m(torch.randn(1, 1, 18, 18, dtype=torch.float64))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"scan_schedule": "fixed:column"},
        {"cluster_order": "random"},
        {"image_size": 24, "cluster_size": 4},  # ragged: 6x6 patches in clusters of 4, 2 (random sizes per sample)
        {"image_size": 24, "cluster_size": 4, "cluster_order": "random"},
        {"unit": "patch-span", "span": 5, "cluster_size": 1},  # 16 tokens in spans of 5: the last holds 1
        {"within_cluster": "causal"},
        {"model": "vit_micro"},
        {"model": "vit_micro", "image_size": 24, "cluster_size": 4, "cluster_order": "random"},
        {"model": "vit_micro", "within_cluster": "causal"},
        {"model": "vim_micro"},
        {"model": "arm_micro", "image_size": 24, "cluster_size": 4, "cluster_order": "random"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_skipping_the_last_unit_changes_no_other_output(overrides):
    cfg = {"image_size": 16, **overrides}
    model = cfg.pop("model", "mal_micro")
    heads = {} if model.startswith(("vim", "arm")) else {"num_heads": 2}
    enc = mal.create_encoder(model, dim=32, depth=2, in_chans=1, **heads, **with_layout(cfg)).double()
    x = torch.randn(3, 1, cfg["image_size"], cfg["image_size"], dtype=torch.float64)
    scan = enc.draw_scan(3)
    full, feats = enc.forward_intermediates(x, [0], mode="pretrain", scan=scan)
    short, feats_s = enc.forward_intermediates(x, [0], mode="pretrain", scan=scan, drop_last_unit=True)
    last = scan.unit_ids[:, -1:]
    n_last = (scan.unit_ids == last).sum(1)
    if bool((n_last == n_last[0]).all()):
        assert short.shape[1] == full.shape[1] - int(n_last[0])
    torch.testing.assert_close(short, full[:, : short.shape[1]], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(feats_s[0], feats[0][:, : short.shape[1]], rtol=1e-10, atol=1e-10)
    # the objective gives the same loss with and without the skip
    m = MALPretrainer(enc, ObjectiveConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2)).double()
    a = m(x, scan=scan)["loss"]
    m.cfg.skip_last_unit = False
    torch.testing.assert_close(m(x, scan=scan)["loss"], a, rtol=1e-10, atol=1e-10)
