"""The Mamba encoders (Vim, ARM's MambaMLP): sizes beside the papers', fine-tune scans, the causal pretrain mode over
every layout (perturbation and exact-zero gradients), which scans train in each mode, backends, the MAE pass and the
classifier surface. Save / load round trips of every registered model are in test_model_files.py."""

from __future__ import annotations

import pytest
import torch

import mal
from helpers import with_layout
from mal.models.mamba import MambaEncoder, ScanRoute
from mal.tokens import unserialize

P = 4  # patch size of the small test encoders
FAMILIES = ["vim_micro", "arm_micro"]


def small_encoder(name: str, image: int = 32, **kw) -> MambaEncoder:
    torch.manual_seed(0)
    kw = {"dim": 16, "depth": 2, "patch_size": P, "image_size": image, "d_state": 4, **kw}
    enc = mal.create_encoder(name, **with_layout(kw)).double().eval()
    with torch.no_grad():  # away from the init (D = 1, equal A rows would hide mistakes)
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return enc


def pixel_ids(ids: torch.Tensor) -> torch.Tensor:
    """(B, Gh, Gw) ids of grid cells -> (B, 1, H, W) ids of pixels."""
    return ids.repeat_interleave(P, 1).repeat_interleave(P, 2).unsqueeze(1)


def test_parameter_counts_beside_the_papers():
    counts = {n: sum(p.numel() for p in mal.create_model(n).parameters()) / 1e6 for n in mal.list_models("*_*")
              if n.startswith(("vim_", "arm_")) and not n.endswith("micro")}  # fmt: skip
    # Vim paper Table 1 (7M / 26M / 98M) and ARM Table 1 (MambaMLP-B 85M), 1000 classes
    assert counts["vim_tiny"] == pytest.approx(7, rel=0.03)
    assert counts["vim_small"] == pytest.approx(26, rel=0.03)
    assert counts["vim_base"] == pytest.approx(98, rel=0.02)
    assert counts["arm_base"] == pytest.approx(85, rel=0.02)
    arm = mal.create_encoder("arm_base")
    assert arm.cfg.expand == 1 and len(arm.blocks[0].mixer.scans) == 4 and arm.blocks[0].mlp is not None
    vim = mal.create_encoder("vim_base")
    assert vim.cfg.expand == 2 and len(vim.blocks[0].mixer.scans) == 2 and vim.blocks[0].mlp is None
    assert vim.num_layers == 24 and arm.num_layers == 12


LAYOUTS = [
    # (image, cluster_size, cluster_order): every kind of order, k in 1..4, ragged grids, per-sample random
    (32, 2, "row"),
    (32, 2, "column_backward"),
    (32, 2, "random"),
    (32, 1, "row"),
    (36, 3, "column"),
    (40, 4, "random"),  # 10x10 grid, clusters 4, 4, 2
    (40, 3, "row_backward"),  # 10x10, clusters 3, 3, 3, 1
]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(("image", "k", "order"), LAYOUTS)
def test_pretrain_mode_ignores_later_clusters_and_later_tokens_of_its_own(name, image, k, order):
    enc = small_encoder(name, image, cluster_size=k, cluster_order=order)
    x = torch.randn(2, 3, image, image, dtype=torch.float64)
    scan = enc.draw_scan(2)
    out = enc(x, mode="pretrain", scan=scan)  # canonical = scan order
    rank = scan.inverse.view(2, *scan.grid_unit_ids().shape[1:])  # position of every cell in the scan
    L = out.shape[1]
    for t in sorted({0, 3, L // 2, L - 2}):
        x2 = x.clone()
        later = pixel_ids(rank).expand_as(x) > t
        x2[later] = torch.randn(int(later.sum()), dtype=x.dtype)
        out2 = enc(x2, mode="pretrain", scan=scan)
        assert torch.equal(out[:, : t + 1], out2[:, : t + 1]), f"token <= {t} changed when later tokens changed"
        assert (out[:, t + 1 :] - out2[:, t + 1 :]).abs().max() > 1e-3  # the perturbation is real
        # the same weights in finetune mode are bidirectional: the first token sees the change
        assert (enc(x)[:, 0] - enc(x2)[:, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(("k", "order"), [(2, "row"), (3, "random"), (4, "column_backward")])
def test_pretrain_jacobian_to_later_units_is_exactly_zero(name, k, order):
    image = 40 if k != 2 else 32
    enc = small_encoder(name, image, cluster_size=k, cluster_order=order)
    x = torch.randn(2, 3, image, image, dtype=torch.float64, requires_grad=True)
    scan = enc.draw_scan(2)
    out = enc(x, mode="pretrain", scan=scan)
    ids = pixel_ids(scan.grid_unit_ids()).expand_as(x)
    for u in range(int(scan.unit_ids.max())):
        (grad,) = torch.autograd.grad(out[scan.unit_ids == u].sum(), x, retain_graph=True)
        assert torch.equal(grad[ids > u], torch.zeros_like(grad[ids > u])), f"unit {u} reads later pixels"
        assert grad[ids == u].abs().max() > 0 and grad[ids < u].abs().max() > 0 if u else True


def test_which_scans_train_in_each_mode():
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for name, pretrain_used in (("vim_micro", {0, 1}), ("arm_micro", {0})):
        enc = small_encoder(name)
        for mode, used in (("pretrain", pretrain_used), ("finetune", set(range(len(enc.blocks[0].mixer.scans))))):
            enc.zero_grad()
            enc(x, mode=mode).square().sum().backward()
            got = {j for j, s in enumerate(enc.blocks[0].mixer.scans) if s.x_proj.weight.grad is not None}
            assert got == used, (name, mode, got)


def reference_mixer(mixer, x, routes):  # noqa: ANN001, ANN201
    """The layer written out: each scan on its own reordered copy, the outputs put back and averaged, gated."""
    u, z = mixer.in_proj(x).chunk(2, dim=-1)
    ys = []
    for scan, (perm, reverse) in zip(mixer.scans, routes, strict=False):
        seq = u[:, perm]
        seq = seq.flip(1) if reverse else seq
        y = scan(seq, backend="loop", chunk_size=16)
        y = y.flip(1) if reverse else y
        ys.append(torch.empty_like(y).index_copy_(1, perm, y))
    return mixer.out_proj(torch.stack(ys).mean(0) * torch.nn.functional.silu(z))


def test_arm_finetune_scans_rows_and_columns_both_ways():
    enc = small_encoder("arm_micro", 24, cluster_size=1)  # raster canonical order on a 6x6 grid
    mixer = enc.blocks[0].mixer
    x = torch.randn(2, 36, 16, dtype=torch.float64)
    rows = torch.arange(36)
    cols = torch.arange(36).view(6, 6).T.reshape(-1)  # raster indices in column-major order
    routes = enc.finetune_routes((6, 6), enc.layout.order)
    want = reference_mixer(mixer, x, [(rows, False), (rows, True), (cols, False), (cols, True)])
    torch.testing.assert_close(mixer(x, routes, backend="loop"), want, rtol=1e-12, atol=1e-12)
    assert torch.equal(ScanRoute(routes[2].perm).to_scan(x[..., :1])[0, :, 0], x[0, cols, 0])


def test_vim_finetune_is_forward_and_backward_along_the_canonical_order():
    enc = small_encoder("vim_micro", 32, cluster_size=2)  # canonical = cluster-serialized
    mixer = enc.blocks[1].mixer
    x = torch.randn(2, 64, 16, dtype=torch.float64)
    rows = torch.arange(64)
    routes = enc.finetune_routes((8, 8), enc.layout.order)
    want = reference_mixer(mixer, x, [(rows, False), (rows, True)])
    torch.testing.assert_close(mixer(x, routes, backend="loop"), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", FAMILIES)
def test_scan_backends_agree_in_the_encoder(name):
    outs = []
    for backend in ("loop", "parallel"):
        enc = small_encoder(name, 40, cluster_size=3, cluster_order="random", backend=backend, scan_chunk=5)
        torch.manual_seed(1)
        scan = enc.draw_scan(2)
        x = torch.randn(2, 3, 40, 40, dtype=torch.float64, requires_grad=True)
        out = enc(x, mode="pretrain", scan=scan) + enc(x).mean()
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        outs.append((out.detach(), grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_classifier_surface_and_layer_decay(name):
    model = mal.create_model(name, num_classes=5, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    assert model.num_features == model.head_hidden_size == 96 and model(x).shape == (2, 5)
    final, maps = model.forward_intermediates(x, indices=[0, -1])
    assert [m.shape for m in maps] == [(2, 96, 8, 8)] * 2
    _, canonical = model.encoder.forward_intermediates(x, [0])
    torch.testing.assert_close(
        maps[0].flatten(2).transpose(1, 2), unserialize(canonical[0], model.encoder.layout.order)
    )
    n = model.num_layers
    assert model.layer_of("encoder.blocks.0.mixer.scans.0.A_log") == 1 and model.layer_of("head.weight") == n + 1
    assert "encoder.blocks.0.mixer.scans.0.A_log" in model.no_weight_decay()
    assert "encoder.blocks.0.mixer.scans.0.D" in model.no_weight_decay()


def test_bad_options_are_one_clear_line():
    with pytest.raises(ValueError, match="within_cluster=causal"):
        mal.create_encoder("vim_micro", layout={"within_cluster": "full"})
    with pytest.raises(ValueError, match="finetune_scans=3 is out of range"):
        mal.create_encoder("arm_micro", finetune_scans=3)
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        mal.create_encoder("vim_micro", backend="cuda")(torch.randn(1, 3, 32, 32))


def test_causal_depthwise_conv_is_the_left_padded_conv1d():
    from mal.models.mamba import causal_depthwise_conv

    conv = torch.nn.Conv1d(6, 6, 4, groups=6).double()
    u = torch.randn(2, 9, 6, dtype=torch.float64)
    want = conv(torch.nn.functional.pad(u.transpose(1, 2), (3, 0))).transpose(1, 2)
    torch.testing.assert_close(causal_depthwise_conv(u, conv.weight, conv.bias), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(causal_depthwise_conv(u, conv.weight, None), want - conv.bias, rtol=1e-12, atol=1e-12)
