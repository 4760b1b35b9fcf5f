"""Baselines in the same framework (MAL-v2 Table 4): the ViT encoder in both modes, and MAE pretraining (random
masking, encoder on the visible patches) for ViT and ViL."""

from __future__ import annotations

import pytest
import torch

import mal
from helpers import with_layout
from mal.pretrain import MAEPretrainer, ObjectiveConfig, normalize_patches
from mal.tokens import canonical_visible, patchify

P = 4


def encoder(name: str, **kw):
    torch.manual_seed(0)
    kw = {"dim": 32, "depth": 2, "in_chans": 1, "image_size": 16, **kw}
    if name.startswith("vit"):
        kw.setdefault("num_heads", 2)
    enc = mal.create_encoder(name, **with_layout(kw)).double().eval()
    with torch.no_grad():  # away from the init (zero norm offsets / gate weights would hide mistakes)
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return enc


def perturb_patches(x: torch.Tensor, raster: torch.Tensor, gw: int) -> torch.Tensor:
    """Copy of ``x (B, C, H, W)`` with new pixels in the patches ``raster (B, n)``."""
    y = x.clone()
    for b in range(x.shape[0]):
        for r in raster[b].tolist():
            i, j = divmod(r, gw)
            y[b, :, i * P : (i + 1) * P, j * P : (j + 1) * P] = torch.randn(x.shape[1], P, P, dtype=x.dtype)
    return y


def test_vit_sizes_match_the_standard_vits():
    counts = {n: sum(p.numel() for p in mal.create_model(n).parameters()) / 1e6 for n in ("vit_tiny", "vit_small")}
    assert counts["vit_tiny"] == pytest.approx(5.7, rel=0.02)  # DeiT-T / ViT-T at 1000 classes
    assert counts["vit_small"] == pytest.approx(22.0, rel=0.02)


def test_vit_finetune_mode_is_bidirectional_and_order_free():
    enc = encoder("vit_micro")
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    out = enc(x)  # canonical order = the cluster layout's
    raster = mal.tokens.unserialize(out, enc.layout.order)
    plain = encoder("vit_micro", cluster_size=1)  # same weights (same seed), raster order
    torch.testing.assert_close(mal.tokens.unserialize(plain(x), plain.layout.order), raster)
    y = perturb_patches(x, torch.tensor([[15], [15]]), 4)  # the last raster patch
    assert (enc(y)[:, 0] - out[:, 0]).abs().max() > 1e-4  # the first token sees it


@pytest.mark.parametrize(("k", "order"), [(2, "row"), (2, "random"), (3, "column_backward")])
def test_vit_pretrain_mode_is_cluster_causal(k, order):
    enc = encoder("vit_micro", image_size=20, cluster_size=k, cluster_order=order)
    x = torch.randn(2, 1, 20, 20, dtype=torch.float64, requires_grad=True)
    scan = enc.draw_scan(2)
    out = enc(x, mode="pretrain", scan=scan)
    for c in range(int(scan.cluster_ids.max())):
        (grad,) = torch.autograd.grad(out[scan.cluster_ids == c].sum(), x, retain_graph=True)
        g = patchify(grad, P).abs().sum(-1)  # (B, L) raster
        later = torch.zeros_like(g, dtype=torch.bool).scatter(1, scan.order, scan.cluster_ids > c)
        assert (g[later] == 0).all(), f"cluster {c} reads a later cluster"
        assert (g[~later] > 0).all()  # and reads its own and every earlier patch


def test_vit_layer_decay_groups_count_blocks():
    model = mal.create_model("vit_micro", num_classes=3)  # 4 blocks
    assert model.num_layers == 4
    assert model.layer_of("encoder.blocks.3.attn.q.weight") == 4
    assert model.layer_of("encoder.pos_embed.embed") == 0
    assert model.layer_of("head.weight") == 5


@pytest.mark.parametrize("name", ["vit_micro", "mal_micro", "vim_micro", "arm_micro"])
def test_forward_visible_with_every_patch_visible_is_the_finetune_pass(name):
    enc = encoder(name)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    visible = torch.stack([torch.randperm(16), torch.randperm(16)])
    out, order = enc.forward_visible(x, visible)
    assert torch.equal(order, enc.layout.order.expand(2, -1))  # canonical scan order
    torch.testing.assert_close(out, enc(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["vit_micro", "mal_micro", "vim_micro", "arm_micro"])
def test_forward_visible_never_reads_masked_patches(name):
    enc = encoder(name, scan_schedule="alternating") if name == "mal_micro" else encoder(name)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    perm = torch.stack([torch.randperm(16), torch.randperm(16)])
    visible, hidden = perm[:, :4], perm[:, 4:]
    out, order = enc.forward_visible(x, visible)
    assert out.shape == (2, 4, 32)
    assert torch.equal(order.sort(1).values, visible.sort(1).values)
    out2, _ = enc.forward_visible(perturb_patches(x, hidden, 4), visible)
    assert torch.equal(out, out2)
    out3, _ = enc.forward_visible(perturb_patches(x, visible[:, :1], 4), visible)
    assert (out3 - out).abs().max() > 1e-4


def test_canonical_visible_sorts_by_scan_rank():
    order = torch.tensor([3, 0, 2, 1])  # raster 3 first, then 0, 2, 1
    assert canonical_visible(order, torch.tensor([[0, 1, 3]])).tolist() == [[3, 0, 1]]


@pytest.mark.parametrize("name", ["vit_micro", "mal_micro", "vim_micro", "arm_micro"])
def test_mae_loss_is_the_mse_of_the_masked_patches(name):
    m = MAEPretrainer(encoder(name), ObjectiveConfig(method="mae", decoder_dim=16, decoder_depth=1, decoder_heads=2))
    m = m.double()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    out = m(x, generator=torch.Generator().manual_seed(0))
    assert out["pred"].shape == (3, 16, 16) and out["mask"].shape == (3, 16)
    assert (out["mask"].sum(1) == 12).all()  # floor(16 * 0.75) hidden per sample
    target = normalize_patches(patchify(x, P))
    torch.testing.assert_close(out["target"], target)
    per_patch = (out["pred"] - target).pow(2).mean(-1)
    torch.testing.assert_close(out["loss"], per_patch[out["mask"] > 0].mean())
    assert torch.isfinite(out["pred"]).all()


def test_mae_masks_differ_per_sample_and_follow_the_generator():
    m = MAEPretrainer(encoder("vit_micro"), ObjectiveConfig(method="mae", decoder_dim=16, decoder_depth=1))
    a = m.draw_visible(4, 16, "cpu", torch.Generator().manual_seed(1))
    b = m.draw_visible(4, 16, "cpu", torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (4, 4)
    assert len({tuple(sorted(r)) for r in a.tolist()}) > 1


def test_mae_reconstruction_keeps_visible_patches():
    m = MAEPretrainer(encoder("mal_micro"), ObjectiveConfig(method="mae", decoder_dim=16, decoder_depth=1)).double()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    out = m(x)
    out["pred"] = out["target"].clone()  # a perfect prediction gives back the image
    rec = m.reconstruct(x, out)
    torch.testing.assert_close(rec["prediction"], x)
    ctx = patchify(rec["context"], P).abs().sum(-1)
    assert ((ctx > 0) == (out["mask"] == 0)).all()


def test_mae_with_multitask_or_taps_is_refused():
    from mal.pretrain.task import PretrainConfig, build_pretrainer

    with pytest.raises(ValueError, match="memory=taps"):
        ObjectiveConfig(method="mae", memory="taps").validate()
    cfg = PretrainConfig()
    cfg.objective.method = "mae"
    cfg.multitask.depth_weight = 1.0
    with pytest.raises(ValueError, match="multi-task pretraining builds on the autoregressive"):
        build_pretrainer(cfg, in_chans=1)
