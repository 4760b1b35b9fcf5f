"""Cluster-causal (pretrain) mode of the encoder: no information from later clusters, same weights as fine-tuning."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

from helpers import FIXTURES, with_layout
from mal.models import create_encoder, vil_from_official
from mal.models.vil import conv_validity
from mal.tokens import CLUSTER_ORDERS

FIXTURE = FIXTURES / "vil2_mini.safetensors"
P = 4  # patch size of the small test encoders


def small_encoder(image=32, **kw):
    torch.manual_seed(0)
    kw = {"dim": 16, "depth": 2, "patch_size": P, "image_size": image, **kw}
    enc = create_encoder("vil_micro", **with_layout(kw)).double().eval()
    # move every parameter away from its init: zero gate weights / norm offsets would hide mistakes
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return enc


def pixel_ids(scan, ids):
    """(B, Gh, Gw) ids of grid cells -> (B, 1, H, W) ids of pixels."""
    return ids.repeat_interleave(P, 1).repeat_interleave(P, 2).unsqueeze(1)


def replace_later(x, scan, c, grid_ids=None):
    """Copy of x with every pixel of clusters > c replaced by noise."""
    ids = pixel_ids(scan, scan.grid_cluster_ids() if grid_ids is None else grid_ids).expand_as(x)
    x2 = x.clone()
    x2[ids > c] = torch.randn(int((ids > c).sum()), dtype=x.dtype)
    return x2


LAYOUTS = [
    # (image, cluster_size, cluster_order, schedule): every cluster order, both schedules, k in 1..4, ragged grids
    *[(32, 2, order, "alternating") for order in CLUSTER_ORDERS],
    *[(32, 2, order, "fixed:column_backward") for order in ("row", "column_backward", "random")],
    (32, 1, "row", "alternating"),
    (36, 3, "column", "alternating"),
    (32, 4, "row_backward", "alternating"),
    (40, 4, "random", "alternating"),  # 10x10 grid, clusters 4,4,2: ragged, per-sample random order
    (40, 3, "row", "fixed:row_backward"),  # 10x10, clusters 3,3,3,1
]


@pytest.mark.parametrize(("image", "k", "order", "schedule"), LAYOUTS)
def test_pretrain_mode_ignores_later_clusters(image, k, order, schedule):
    enc = small_encoder(image, cluster_size=k, cluster_order=order, scan_schedule=schedule)
    x = torch.randn(2, 3, image, image, dtype=torch.float64)
    scan = enc.draw_scan(2)
    out = enc(x, mode="pretrain", scan=scan)
    K = int(scan.cluster_ids.max()) + 1
    for c in sorted({0, K // 2, K - 2}):
        x2 = replace_later(x, scan, c)
        out2 = enc(x2, mode="pretrain", scan=scan)
        early = scan.cluster_ids <= c
        assert torch.equal(out[early], out2[early]), f"cluster <= {c} changed when later clusters changed"
        assert (out[~early] - out2[~early]).abs().max() > 1e-3  # the perturbation is real
        # the same weights in finetune mode are bidirectional: early tokens do see the change
        ft, ft2 = enc(x, mode="finetune", scan=scan), enc(x2, mode="finetune", scan=scan)
        assert (ft[early] - ft2[early]).abs().max() > 1e-3


@pytest.mark.parametrize(("k", "order"), [(2, "row"), (3, "random"), (4, "column_backward")])
def test_pretrain_jacobian_to_later_clusters_is_zero(k, order):
    image = 40 if k != 2 else 32
    enc = small_encoder(image, cluster_size=k, cluster_order=order, scan_schedule="alternating")
    x = torch.randn(2, 3, image, image, dtype=torch.float64, requires_grad=True)
    scan = enc.draw_scan(2)
    out = enc(x, mode="pretrain", scan=scan)
    ids = pixel_ids(scan, scan.grid_cluster_ids()).expand_as(x)
    K = int(scan.cluster_ids.max()) + 1
    for c in range(K - 1):
        (grad,) = torch.autograd.grad(out[scan.cluster_ids == c].sum(), x, retain_graph=True)
        assert torch.equal(grad[ids > c], torch.zeros_like(grad[ids > c])), f"cluster {c} reads later pixels"
        assert grad[ids == c].abs().max() > 0  # its own cluster is read


def test_within_cluster_causal_ignores_later_tokens_of_the_scan():
    enc = small_encoder(32, cluster_size=2, within_cluster="causal", scan_schedule="fixed:column")
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    scan = enc.draw_scan(1)
    rank = scan.inverse.view(1, 8, 8)  # position of every grid cell in the (single) scan order
    out = enc(x, mode="pretrain", scan=scan)
    for t in (0, 5, 30, 62):
        out2 = enc(replace_later(x, scan, t, grid_ids=rank), mode="pretrain", scan=scan)
        assert torch.equal(out[:, : t + 1], out2[:, : t + 1])
    # "full" (the default) lets a token read its whole cluster: the first token sees the second
    full = small_encoder(32, cluster_size=2, scan_schedule="fixed:column")
    out, out2 = (full(v, mode="pretrain", scan=scan) for v in (x, replace_later(x, scan, 0, grid_ids=rank)))
    assert (out[:, 0] - out2[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("k", [2, 3])
def test_pretrain_backends_agree(k):
    outs = []
    for backend in ("parallel", "chunkwise", "recurrent"):
        enc = small_encoder(40, cluster_size=k, cluster_order="random", backend=backend, chunk_size=8)
        torch.manual_seed(1)
        scan = enc.draw_scan(2)
        x = torch.randn(2, 3, 40, 40, dtype=torch.float64, requires_grad=True)
        out = enc(x, mode="pretrain", scan=scan)
        (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum(), x)
        outs.append((out.detach(), grad))
    for out, grad in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, outs[0][1], atol=1e-6, rtol=0)


def test_finetune_mode_with_single_patch_clusters_matches_the_official_fixture():
    tensors = load_file(FIXTURE)
    state = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    model = vil_from_official(
        state, image_size=32, patch_size=4, num_classes=10, layout=dict(cluster_size=1, scan_schedule="fixed:row")
    )
    with torch.no_grad():
        torch.testing.assert_close(model(tensors["input"]), tensors["logits"], atol=2e-5, rtol=0)


def test_finetune_cell_cluster_equals_vil_for_single_patch_clusters():
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    a = small_encoder(32, cluster_size=1, scan_schedule="alternating")
    b = small_encoder(32, cluster_size=1, scan_schedule="alternating", finetune_cell="cluster")
    torch.testing.assert_close(a(x), b(x), atol=1e-10, rtol=0)
    c = small_encoder(32, cluster_size=2, scan_schedule="alternating", finetune_cell="cluster")
    assert (a(x) - c(x)).abs().max() > 1e-3


def test_pretrain_conv_uses_the_same_spatial_filter_as_finetune():
    # one cluster covering the whole grid: no neighbour is masked, so the conv of both blocks must equal the
    # finetune conv (whose backward block sees the image rotated by 180 degrees)
    enc = small_encoder(16, cluster_size=4, scan_schedule="fixed:row")
    seq_ft, seq_pt = (enc.plan((4, 4), mode, torch.device("cpu")) for mode in ("finetune", "pretrain"))
    inside = conv_validity(torch.zeros(1, 4, 4, dtype=torch.long), 3)  # only out-of-image neighbours invalid
    assert all(torch.equal(p.conv_valid, inside) for p in seq_pt.blocks)
    x_m = torch.randn(2, 16, enc.cfg.inner, dtype=torch.float64)
    layer = enc.blocks[0].bwd.layer
    torch.testing.assert_close(
        layer._conv(x_m, seq_ft, seq_ft.blocks[1]),
        layer._conv(x_m, seq_pt, seq_pt.blocks[1]),
        atol=1e-12,
        rtol=0,
    )
    # and the backward block's kernel is the rotated one: it differs from the forward block's orientation
    assert (layer._conv(x_m, seq_pt, seq_pt.blocks[0]) - layer._conv(x_m, seq_pt, seq_pt.blocks[1])).abs().max() > 1e-3


def test_conv_validity_masks_only_later_neighbours():
    ids = torch.tensor([[[0, 0, 1], [0, 0, 1], [2, 2, 3]]])
    valid = conv_validity(ids, 3).view(1, 3, 3, 3, 3)  # (B, dy, dx, H, W)
    # centre (0,0) of cluster 0: right neighbour (cluster 0) valid, lower-right (0,1,1 -> cluster 0) valid
    assert valid[0, 1, 2, 0, 0] and valid[0, 2, 2, 0, 0]
    # cell (1,1) of cluster 0: right neighbour is cluster 1 (later) -> invalid; lower neighbour cluster 2 -> invalid
    assert not valid[0, 1, 2, 1, 1] and not valid[0, 2, 1, 1, 1]
    # cell (2,2) of cluster 3 sees everything around it
    assert valid[0, :2, :2, 2, 2].all()
    # out-of-image neighbours are invalid
    assert not valid[0, 0, :, 0, 0].any()


def test_encoder_exposes_layout_ids_and_order():
    enc = create_encoder("mal_tiny")  # 192 px, 12x12 grid, 4x4 clusters
    layout = enc.layout
    assert layout.cluster_ids.shape == layout.order.shape == (144,)
    assert layout.num_clusters == 9
    assert torch.equal(layout.cluster_ids, torch.arange(9).repeat_interleave(16))
    assert sorted(layout.order.tolist()) == list(range(144))


def test_new_resolution_keeps_the_cluster_grid_and_stays_causal():
    enc = small_encoder(32, cluster_size=3, cluster_order="row")  # 8x8 grid: clusters 3,3,2 -> 3x3 clusters
    assert enc.layout.num_clusters == 9
    big = enc.layout_for((10, 10))
    assert big.row_spans == (4, 3, 3) and big.num_clusters == 9
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    scan = big.draw(1)
    out = enc(x, mode="pretrain")
    out2 = enc(replace_later(x, scan, 4), mode="pretrain")
    early = scan.cluster_ids <= 4
    assert torch.equal(out[early], out2[early])


def test_random_order_finetunes_in_row_order():
    enc = small_encoder(32, cluster_size=2, cluster_order="random")
    seq = enc.plan((8, 8), "finetune", torch.device("cpu"))
    row = small_encoder(32, cluster_size=2, cluster_order="row").plan((8, 8), "finetune", torch.device("cpu"))
    assert torch.equal(seq.order, row.order)
    with pytest.raises(ValueError, match="random cluster order needs a per-sample scan"):
        enc.plan((8, 8), "pretrain", torch.device("cpu"))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(cluster_size=9), "cluster size 9 is larger than the 8x8 patch grid"),
        (dict(cluster_order="diagonal"), "diagonal"),
        (dict(scan_schedule="fixed:zigzag"), "zigzag"),
        (dict(scan_schedule=("row",)), "scan schedule has 1 entries but the encoder has 2 block pairs"),
        (dict(within_cluster="half"), "unknown within_cluster 'half'"),
        (dict(finetune_cell="sideways"), "unknown finetune_cell 'sideways'"),
    ],
)
def test_bad_layout_options_give_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        small_encoder(32, **kw)


def test_plan_cache_is_per_grid_and_mode():
    enc = small_encoder(32, cluster_size=2)
    cpu = torch.device("cpu")
    for grid, mode in itertools.product([(8, 8), (10, 10)], ["finetune", "pretrain"]):
        assert enc.plan(grid, mode, cpu) is enc.plan(grid, mode, cpu)
    assert enc.plan((8, 8), "pretrain", cpu) is not enc.plan((8, 8), "finetune", cpu)
