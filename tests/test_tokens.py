"""Tests for mal.tokens: grid <-> sequence permutations, clusters, units, schedules, patches."""

import itertools
from dataclasses import replace

import pytest
import torch

from mal.tokens import (
    CLUSTER_ORDERS,
    WITHIN_ORDERS,
    ClusterLayout,
    LayoutConfig,
    Scan,
    cluster_spans,
    grid_size,
    invert_permutation,
    parse_schedule,
    patchify,
    serialize,
    span_for_ratio,
    unpatchify,
    unserialize,
)

# (grid_h, grid_w, build kwargs): square, ragged, non-square and cluster-grid layouts
GRIDS = [
    (12, 12, {"cluster_size": 1}),
    (12, 12, {"cluster_size": 4}),
    (6, 6, {"cluster_size": 2}),
    (9, 9, {"cluster_size": 3}),
    (14, 14, {"cluster_size": 4}),
    (5, 7, {"cluster_size": 2}),
    (7, 5, {"cluster_size": 3}),
    (14, 14, {"cluster_grid": 3}),
]
ALL_LAYOUTS = [
    ClusterLayout.build(h, w, cluster_order=co, within_order=wo, **kw)
    for (h, w, kw), co, wo in itertools.product(GRIDS, CLUSTER_ORDERS, WITHIN_ORDERS)
]


def _scans(layout: ClusterLayout) -> Scan:
    return layout.draw(4, torch.Generator().manual_seed(1))


def _layout_id(layout: ClusterLayout) -> str:
    return f"{layout.grid_h}x{layout.grid_w}-{layout.row_spans}-{layout.cluster_order}-{layout.within_order}"


def for_each_layout(check) -> None:  # noqa: ANN001
    """Run ``check(layout)`` on all of ALL_LAYOUTS (one test, many checks); a failure names its layout."""
    for layout in ALL_LAYOUTS:
        try:
            check(layout)
        except AssertionError as e:
            raise AssertionError(f"layout {_layout_id(layout)}: {e}") from e


def _expected_clusters(layout: ClusterLayout) -> list[set[int]]:
    """Raster cells of every cluster rectangle, written out from the spans."""
    clusters = []
    r0 = 0
    for hs in layout.row_spans:
        c0 = 0
        for ws in layout.col_spans:
            cells = {(r0 + i) * layout.grid_w + c0 + j for i in range(hs) for j in range(ws)}
            clusters.append(cells)
            c0 += ws
        r0 += hs
    return clusters


# ----------------------------------------------------------------------------------------------
# sizes


def test_grid_size_accepts_int_and_pair():
    assert grid_size(192, 16) == (12, 12)
    assert grid_size((224, 160), 16) == (14, 10)


def test_grid_size_rejects_sizes_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match="image size 30x32 is not divisible by patch size 4"):
        grid_size((30, 32), 4)


def test_cluster_spans_tile_with_ragged_last_cluster():
    assert cluster_spans(14, cluster_size=4) == [4, 4, 4, 2]
    assert cluster_spans(12, cluster_size=4) == [4, 4, 4]
    assert cluster_spans(5, cluster_size=5) == [5]


def test_cluster_spans_grid_is_near_equal_larger_first():
    assert cluster_spans(14, cluster_grid=3) == [5, 5, 4]
    assert cluster_spans(12, cluster_grid=3) == [4, 4, 4]
    assert cluster_spans(16, cluster_grid=3) == [6, 5, 5]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cluster_size": 0}, "cluster size must be >= 1"),
        ({"cluster_size": 5}, "cluster size 5 is larger than the 4 patches"),
        ({"cluster_grid": 5}, "cluster grid 5 has more clusters than the 4 patches"),
        ({"cluster_grid": 0}, "cluster grid must be >= 1"),
        ({}, "exactly one of cluster_size and cluster_grid"),
        ({"cluster_size": 2, "cluster_grid": 2}, "exactly one of cluster_size and cluster_grid"),
    ],
)
def test_cluster_spans_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cluster_spans(4, **kwargs)


# ----------------------------------------------------------------------------------------------
# permutation invariants over every order, cluster size and grid


def _round_trip_raster_to_sequence_to_raster_is_identity(layout):
    x = torch.randn(4, layout.num_tokens, 3)
    assert torch.equal(unserialize(serialize(x, layout.order), layout.order), x)
    assert torch.equal(serialize(x, layout.order)[:, layout.inverse], x)
    scan = _scans(layout)  # per-sample (random orders differ per sample)
    assert torch.equal(unserialize(serialize(x, scan.order), scan.order), x)
    assert torch.equal(serialize(unserialize(x, scan.order), scan.order), x)


def _clusters_are_contiguous_rectangles_in_prediction_order(layout):
    rectangles = _expected_clusters(layout)
    scan = _scans(layout)
    fixed = Scan(layout.order[None], layout.cluster_ids[None], layout.unit_ids[None], layout.grid_h, layout.grid_w)
    for s, grid_ids in ((fixed, layout.grid_cluster_ids[None]), (scan, scan.grid_cluster_ids())):
        for b in range(s.batch_size):
            order, cids = s.order[b], s.cluster_ids[b]
            assert torch.equal(order.sort().values, torch.arange(layout.num_tokens))  # a permutation
            assert bool((cids.diff() >= 0).all())  # non-decreasing
            assert cids[0] == 0 and cids[-1] == layout.num_clusters - 1
            seen = []
            for k in range(layout.num_clusters):
                cells = set(order[cids == k].tolist())
                assert cells in rectangles  # exactly one cluster rectangle
                assert cells == set(torch.nonzero(grid_ids[b].reshape(-1) == k).flatten().tolist())
                seen.append(frozenset(cells))
            assert len(set(seen)) == layout.num_clusters


def _layout_tensors_are_consistent(layout):
    assert int(layout.cluster_sizes.sum()) == layout.num_tokens
    assert torch.equal(layout.cluster_bounds[1:] - layout.cluster_bounds[:-1], layout.cluster_sizes)
    assert torch.equal(layout.inverse[layout.order], torch.arange(layout.num_tokens))
    assert torch.equal(layout.grid_cluster_ids.reshape(-1)[layout.order], layout.cluster_ids)
    assert torch.equal(layout.unit_ids, layout.cluster_ids)
    assert torch.equal(layout.grid_unit_ids, layout.grid_cluster_ids)


def _within_order_inside_each_cluster_matches_its_definition(layout):
    w = layout.grid_w
    bounds = layout.cluster_bounds.tolist()
    for k in range(layout.num_clusters):
        tokens = layout.order[bounds[k] : bounds[k + 1]].tolist()
        cells = [divmod(t, w) for t in tokens]
        row_major = sorted(cells)
        col_major = sorted(cells, key=lambda hw: (hw[1], hw[0]))
        expected = {
            "row": row_major,
            "column": col_major,
            "row_backward": row_major[::-1],
            "column_backward": col_major[::-1],
        }[layout.within_order]
        assert cells == expected


def test_round_trip_raster_to_sequence_to_raster_is_identity():
    for_each_layout(_round_trip_raster_to_sequence_to_raster_is_identity)


def test_clusters_are_contiguous_rectangles_in_prediction_order():
    for_each_layout(_clusters_are_contiguous_rectangles_in_prediction_order)


def test_layout_tensors_are_consistent():
    for_each_layout(_layout_tensors_are_consistent)


def test_within_order_inside_each_cluster_matches_its_definition():
    for_each_layout(_within_order_inside_each_cluster_matches_its_definition)


def test_cluster_size_one_row_order_is_raster_order():
    for h, w in ((12, 12), (5, 7)):
        layout = ClusterLayout.build(h, w, cluster_size=1)
        assert torch.equal(layout.order, torch.arange(h * w))
        assert torch.equal(layout.cluster_ids, torch.arange(h * w))


def test_ragged_cluster_sizes_for_14x14_with_k4():
    layout = ClusterLayout.build(14, 14, cluster_size=4)
    assert layout.row_spans == (4, 4, 4, 2) and layout.col_spans == (4, 4, 4, 2)
    assert layout.num_clusters == 16
    assert layout.cluster_sizes.tolist() == [16, 16, 16, 8] * 3 + [8, 8, 8, 4]
    assert layout.cluster_bounds.tolist()[:5] == [0, 16, 32, 48, 56]
    assert layout.cluster_bounds[-1] == 196


def test_cluster_grid_layout_14x14_into_3x3():
    layout = ClusterLayout.build(14, 14, cluster_grid=3)
    assert layout.row_spans == (5, 5, 4)
    assert layout.cluster_sizes.tolist() == [25, 25, 20, 25, 25, 20, 20, 20, 16]


# ----------------------------------------------------------------------------------------------
# hand-written 4x4 grid, k = 2. Clusters: A = {0,1,4,5}, B = {2,3,6,7}, C = {8,9,12,13}, D = {10,11,14,15}


@pytest.mark.parametrize(
    ("cluster_order", "within_order", "expected"),
    [
        ("row", "row", [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]),  # A B C D
        ("column", "row", [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]),  # A C B D
        ("row_backward", "row", [2, 3, 6, 7, 0, 1, 4, 5, 10, 11, 14, 15, 8, 9, 12, 13]),  # B A D C
        ("row", "column", [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]),
        ("row", "row_backward", [5, 4, 1, 0, 7, 6, 3, 2, 13, 12, 9, 8, 15, 14, 11, 10]),
        (
            "column_backward",
            "column_backward",
            [13, 9, 12, 8, 5, 1, 4, 0, 15, 11, 14, 10, 7, 3, 6, 2],
        ),  # C A D B
    ],
)
def test_hand_written_orders_on_4x4_grid_with_k2(cluster_order, within_order, expected):
    layout = ClusterLayout.build(4, 4, cluster_size=2, cluster_order=cluster_order, within_order=within_order)
    assert layout.order.tolist() == expected
    assert layout.cluster_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def test_hand_written_grid_cluster_ids_for_column_order():
    layout = ClusterLayout.build(4, 4, cluster_size=2, cluster_order="column")
    assert layout.grid_cluster_ids.tolist() == [[0, 0, 2, 2], [0, 0, 2, 2], [1, 1, 3, 3], [1, 1, 3, 3]]


# ----------------------------------------------------------------------------------------------
# within-cluster reordering


@pytest.mark.parametrize(("grid", "cluster_order"), [((14, 14, 4), "column"), ((5, 7, 2), "row_backward")])
def test_with_within_order_only_permutes_inside_clusters(grid, cluster_order):
    h, w, k = grid
    base = ClusterLayout.build(h, w, cluster_size=k, cluster_order=cluster_order)
    for within in WITHIN_ORDERS:
        other = base.with_within_order(within)
        assert other.within_order == within and other.row_spans == base.row_spans
        assert torch.equal(other.cluster_ids, base.cluster_ids)
        assert torch.equal(other.grid_cluster_ids, base.grid_cluster_ids)
        for k_ in range(base.num_clusters):
            a, b = base.cluster_bounds[k_], base.cluster_bounds[k_ + 1]
            assert set(other.order[a:b].tolist()) == set(base.order[a:b].tolist())


@pytest.mark.parametrize("cluster_order", ["row", "random"])
def test_scan_within_perm_satisfies_gather_identity(cluster_order):
    layout = ClusterLayout.build(14, 14, cluster_size=4, cluster_order=cluster_order, within_order="column")
    canonical = layout.draw(3, torch.Generator().manual_seed(5))
    x = torch.randn(3, layout.num_tokens, 2)
    x_canonical = serialize(x, canonical.order)
    for within in WITHIN_ORDERS:
        scan, perm = canonical.within_with_perm(within)
        assert torch.equal(scan.order, canonical.order.gather(1, perm))
        assert torch.equal(scan.cluster_ids, canonical.cluster_ids)  # clusters keep their positions
        assert torch.equal(scan.grid_cluster_ids(), canonical.grid_cluster_ids())
        assert torch.equal(serialize(x_canonical, perm), serialize(x, scan.order))
        assert torch.equal(unserialize(serialize(x_canonical, perm), perm), x_canonical)
        assert torch.equal(canonical.within(within).order, scan.order)
        if cluster_order == "row":  # agrees with the layout built directly in that order
            assert torch.equal(scan.order[0], layout.with_within_order(within).order)
    # a layout can be passed instead of a name
    assert torch.equal(canonical.within(layout.with_within_order("row")).order, canonical.within("row").order)


def test_invert_permutation_batched():
    perm = torch.stack([torch.randperm(10) for _ in range(3)])
    inv = invert_permutation(perm)
    assert torch.equal(perm.gather(1, inv), torch.arange(10).expand(3, 10))


# ----------------------------------------------------------------------------------------------
# new resolution


def test_with_grid_keeps_cluster_grid_with_near_equal_spans():
    layout = ClusterLayout.build(12, 12, cluster_size=4, cluster_order="column", within_order="column")
    new = layout.with_grid(14, 14)
    assert new.row_spans == (5, 5, 4) and new.col_spans == (5, 5, 4)
    assert new.num_clusters == layout.num_clusters == 9
    assert (new.cluster_order, new.within_order) == ("column", "column")
    assert new.cluster_sizes.tolist() == [25, 25, 20, 25, 25, 20, 20, 20, 16]


def test_with_grid_turns_random_cluster_order_into_row():
    layout = ClusterLayout.build(12, 12, cluster_size=4, cluster_order="random")
    assert layout.with_grid(14, 14).cluster_order == "row"


def test_with_grid_keeps_single_patch_clusters():
    new = ClusterLayout.build(12, 12, cluster_size=1).with_grid(14, 14)
    assert torch.equal(new.order, torch.arange(196))
    assert new.num_clusters == 196


def test_with_grid_patch_span_keeps_ratio_else_span():
    by_ratio = ClusterLayout.build(12, 12, unit="patch-span", ratio=0.1).with_grid(14, 14)
    assert by_ratio.span == 19  # floor(0.1 * 196)
    by_span = ClusterLayout.build(12, 12, unit="patch-span", span=14).with_grid(14, 14)
    assert by_span.span == 14


# ----------------------------------------------------------------------------------------------
# random cluster order


def test_random_scan_is_deterministic_given_the_generator():
    layout = ClusterLayout.build(14, 14, cluster_size=4, cluster_order="random")
    a = layout.draw(8, torch.Generator().manual_seed(0))
    b = layout.draw(8, layout.make_generator())  # seed 0 + offset 0
    assert torch.equal(a.order, b.order) and torch.equal(a.cluster_ids, b.cluster_ids)
    c = layout.draw(8, layout.make_generator(1))
    assert not torch.equal(a.order, c.order)


def test_random_scan_gives_samples_different_cluster_orders():
    layout = ClusterLayout.build(12, 12, cluster_size=4, cluster_order="random")
    scan = layout.draw(4, torch.Generator().manual_seed(0))
    grids = scan.grid_cluster_ids()
    assert len({tuple(g.reshape(-1).tolist()) for g in grids}) == 4
    assert torch.equal(scan.unit_ids, scan.cluster_ids)


def test_random_scan_with_ragged_clusters_has_per_sample_cluster_ids():
    layout = ClusterLayout.build(14, 14, cluster_size=4, cluster_order="random", within_order="row_backward")
    scan = layout.draw(6, torch.Generator().manual_seed(0))
    assert bool((scan.cluster_ids.diff(dim=1) >= 0).all())
    assert len({tuple(row.tolist()) for row in scan.cluster_ids}) > 1  # ragged sizes land differently
    for b in range(6):  # each sample's cluster sizes are a permutation of the layout's
        sizes = torch.bincount(scan.cluster_ids[b], minlength=16)
        assert sorted(sizes.tolist()) == sorted(layout.cluster_sizes.tolist())


def test_random_layout_properties_describe_row_order():
    random_layout = ClusterLayout.build(14, 14, cluster_size=4, cluster_order="random")
    row_layout = ClusterLayout.build(14, 14, cluster_size=4)
    assert torch.equal(random_layout.order, row_layout.order)


def test_fixed_order_draw_expands_the_layout():
    layout = ClusterLayout.build(14, 14, cluster_size=4, cluster_order="column_backward")
    scan = layout.draw(5)
    assert scan.order.shape == (5, 196)
    assert torch.equal(scan.order, layout.order.expand(5, -1))
    assert torch.equal(scan.cluster_ids[2], layout.cluster_ids)
    assert torch.equal(scan.grid_unit_ids(14, 14)[1], layout.grid_unit_ids)


# ----------------------------------------------------------------------------------------------
# prediction units


@pytest.mark.parametrize(("ratio", "span"), [(0.01, 1), (0.1, 14), (0.2, 28), (0.3, 43), (0.5, 72), (0.7, 100)])
def test_patch_span_ratio_gives_paper_spans_for_144_tokens(ratio, span):
    assert span_for_ratio(ratio, 144) == span
    layout = ClusterLayout.build(12, 12, unit="patch-span", ratio=ratio)
    assert layout.span == span
    assert torch.equal(layout.unit_ids, torch.arange(144) // span)
    assert torch.equal(layout.order, torch.arange(144))  # raster order
    assert layout.num_units == -(-144 // span)
    assert int(layout.unit_sizes.sum()) == 144
    assert torch.equal(layout.grid_unit_ids.reshape(-1), torch.arange(144) // span)


def test_span_ratio_floor_tolerates_float_error():
    assert span_for_ratio(0.29, 100) == 29


def test_patch_span_scan_carries_unit_ids_and_ignores_within_order():
    layout = ClusterLayout.build(12, 12, unit="patch-span", span=43)
    scan = layout.draw(2)
    assert torch.equal(scan.unit_ids[1], torch.arange(144) // 43)
    for within in WITHIN_ORDERS:  # single-patch clusters: the within order changes nothing
        assert torch.equal(scan.within(within).order, scan.order)
        assert torch.equal(layout.with_within_order(within).order, layout.order)


def test_pixel_units_are_single_tokens():
    layout = ClusterLayout.build(8, 8, unit="pixel", cluster_order="column")
    assert layout.num_units == layout.num_clusters == 64
    assert torch.equal(layout.unit_ids, torch.arange(64))
    assert torch.equal(layout.order, torch.arange(64).view(8, 8).t().reshape(-1))


# ----------------------------------------------------------------------------------------------
# schedules


def test_parse_schedule_fixed():
    assert parse_schedule("fixed:column", 3) == ["column"] * 3


def test_parse_schedule_alternating_cycles_four_orders():
    assert parse_schedule("alternating", 6) == [
        "row",
        "column",
        "row_backward",
        "column_backward",
        "row",
        "column",
    ]


def test_parse_schedule_explicit_list():
    assert parse_schedule(["row", "column"], 2) == ["row", "column"]
    assert parse_schedule("row, column_backward", 2) == ["row", "column_backward"]


def test_parse_schedule_rejects_list_of_wrong_length():
    with pytest.raises(ValueError, match="scan schedule has 2 entries but the encoder has 4 block pairs"):
        parse_schedule(["row", "column"], 4)


@pytest.mark.parametrize("schedule", ["fixed:diagonal", ["row", "zigzag"], "spiral"])
def test_parse_schedule_rejects_unknown_names(schedule):
    with pytest.raises(ValueError, match="unknown .*valid.*row, column, row_backward, column_backward"):
        parse_schedule(schedule, 2)


# ----------------------------------------------------------------------------------------------
# patches


def test_patchify_unpatchify_are_exact_inverses():
    images = torch.randn(2, 3, 12, 20)
    patches = patchify(images, 4)
    assert patches.shape == (2, 15, 48)
    assert torch.equal(unpatchify(patches, 4, 3, 5, channels=3), images)
    p = torch.randn(2, 15, 48)
    assert torch.equal(patchify(unpatchify(p, 4, 3, 5), 4), p)


def test_patchify_flattens_each_patch_as_row_column_channel():
    # image value = 100 * c + 10 * y + x on a 2-channel 4x4 image, patch size 2
    c, y, x = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij")
    image = (100 * c + 10 * y + x)[None].float()
    patches = patchify(image, 2)
    assert patches.shape == (1, 4, 8)
    # patch 1 = rows 0-1, columns 2-3; order (py, px, c) with channel fastest
    assert patches[0, 1].tolist() == [2, 102, 3, 103, 12, 112, 13, 113]
    # patch 2 = rows 2-3, columns 0-1
    assert patches[0, 2].tolist() == [20, 120, 21, 121, 30, 130, 31, 131]


def test_patchify_rejects_image_not_divisible_by_patch():
    with pytest.raises(ValueError, match="image size 30x32 is not divisible by patch size 4"):
        patchify(torch.zeros(1, 3, 30, 32), 4)


def test_serialize_shared_and_per_sample_orders_agree():
    layout = ClusterLayout.build(6, 6, cluster_size=2, cluster_order="column")
    x = torch.randn(3, 36, 5, requires_grad=True)
    a = serialize(x, layout.order)
    b = serialize(x, layout.draw(3).order)
    assert torch.equal(a, b)
    assert torch.equal(a[:, 0], x[:, layout.order[0]])
    b.sum().backward()  # gradients flow through the permutation
    assert torch.equal(x.grad, torch.ones_like(x))
    assert torch.equal(unserialize(a, layout.draw(3).order), unserialize(a, layout.order))


# ----------------------------------------------------------------------------------------------
# errors


def test_cluster_size_larger_than_grid_is_rejected():
    with pytest.raises(ValueError, match="cluster size 5 is larger than the 4x4 patch grid"):
        ClusterLayout.build(4, 4, cluster_size=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cluster_order": "diagonal"}, "unknown cluster order 'diagonal'; valid: row, row_backward, column"),
        ({"within_order": "zigzag"}, "unknown within-cluster order 'zigzag'; valid: row, column"),
        ({"unit": "token"}, "unknown prediction unit 'token'; valid: cluster, patch-span, pixel"),
        ({"unit": "patch-span"}, "needs exactly one of span and ratio"),
        ({"unit": "patch-span", "ratio": 1.5}, r"ratio must be in \(0, 1\]"),
        ({"unit": "patch-span", "span": 200}, r"span must be in \[1, 144\]"),
        ({"unit": "patch-span", "span": 4, "cluster_size": 2}, "single-token clusters"),
        ({"unit": "patch-span", "span": 4, "cluster_order": "column"}, "cluster order must be 'row'"),
        ({"unit": "pixel", "cluster_size": 4}, "single-token clusters"),
        ({"span": 4}, "only apply to unit 'patch-span'"),
        ({"cluster_size": 2, "cluster_grid": 3}, "at most one of cluster_size and cluster_grid"),
        ({"cluster_grid": 13}, "cluster grid 13 must be between 1 and"),
    ],
)
def test_build_rejects_bad_configuration_with_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClusterLayout.build(12, 12, **kwargs)


def test_with_within_order_and_scan_within_reject_unknown_names():
    layout = ClusterLayout.build(4, 4, cluster_size=2)
    with pytest.raises(ValueError, match="unknown within-cluster order 'diag'"):
        layout.with_within_order("diag")
    with pytest.raises(ValueError, match="unknown within-cluster order 'diag'"):
        layout.draw(1).within("diag")


def test_with_grid_rejects_grid_smaller_than_cluster_grid():
    with pytest.raises(ValueError, match="cannot keep the 3x3 cluster grid on a 2x2 patch grid"):
        ClusterLayout.build(12, 12, cluster_size=4).with_grid(2, 2)


def test_for_image_builds_on_the_patch_grid():
    layout = ClusterLayout.for_image(224, 16, cluster_size=4)
    assert (layout.grid_h, layout.grid_w, layout.row_spans) == (14, 14, (4, 4, 4, 2))


# ---------------------------------------------------------------------------------------------------- LayoutConfig


def test_layout_config_keeps_its_cluster_grid_at_another_grid():
    """3x3 clusters of 4 at 12x12 patches (192 px) -> 3x3 clusters of 5, 5, 4 at 14x14 (224 px): docs/DESIGN.md,
    'Resolution change and the cluster grid'."""
    layout = LayoutConfig(cluster_size=4, scan_schedule="alternating").resolved((12, 12))
    assert layout.grid == (12, 12)
    at224 = layout.at_grid((14, 14), "row")
    assert at224.row_spans == at224.col_spans == (5, 5, 4) and at224.cluster_ids.unique().numel() == 9
    assert layout.at_grid((24, 24)).row_spans == (8, 8, 8)
    # the same cluster size given on the 14x14 grid itself tiles it (ragged; docs/DESIGN.md, 'Token layout and
    # clusters')
    assert LayoutConfig(cluster_size=4).resolved((14, 14)).at_grid((14, 14)).row_spans == (4, 4, 4, 2)
    assert layout.at_grid((12, 12)) == ClusterLayout.build(12, 12, cluster_size=4)
    random = LayoutConfig(cluster_size=4, cluster_order="random").resolved((12, 12))
    assert random.at_grid((14, 14)).cluster_order == "random"  # pretraining at another size stays random


def test_layout_config_merged_replaces_the_cluster_shape():
    preset = LayoutConfig(cluster_size=4, grid=(12, 12), scan_schedule="alternating")
    assert preset.merged({"cluster_grid": 2}) == LayoutConfig(cluster_grid=2, scan_schedule="alternating")
    assert preset.merged({"cluster_order": "column"}).grid == (12, 12)  # other options keep the shape
    assert preset.merged({"grid": (6, 6)}).cluster_size == 4
    assert preset.merged(None) is preset and LayoutConfig.from_dict(preset.to_dict()) == preset
    with pytest.raises(ValueError, match="unknown layout option"):
        preset.merged({"clustersize": 2})


def test_layout_signature_compares_token_orders_not_spellings():
    by_size = LayoutConfig(cluster_size=4).resolved((12, 12))
    by_grid = LayoutConfig(cluster_grid=3)
    for grid in ((12, 12), (14, 14), (20, 20)):
        assert by_size.signature(grid, 2) == by_grid.signature(grid, 2)
    assert by_size.signature((12, 12), 2) != LayoutConfig(cluster_size=2).signature((12, 12), 2)
    assert by_size.signature((12, 12), 2) != replace(by_size, scan_schedule="alternating").signature((12, 12), 2)
    assert by_size.signature((12, 12), 2) == replace(by_size, seed=7).signature((12, 12), 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cluster_size": 2, "cluster_grid": 2}, "at most one"),
        ({"cluster_size": 0}, "cluster size must be >= 1"),
        ({"cluster_order": "diagonal"}, "unknown cluster order"),
        ({"scan_schedule": "fixed:zigzag"}, "zigzag"),
        ({"unit": "patch-span", "span": 3, "ratio": 0.1}, "exactly one of span and ratio"),
        ({"unit": "pixel", "cluster_size": 2}, "single-token clusters"),
        ({"span": 3}, "only apply to unit 'patch-span'"),
        ({"within_cluster": "half"}, "unknown within_cluster"),
        ({"finetune_cell": "sideways"}, "unknown finetune_cell"),
        ({"grid": (0, 4)}, "two positive ints"),
    ],
)
def test_layout_config_is_validated_once_with_clear_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayoutConfig(**kwargs)


def test_layout_describe_names_clusters_order_and_schedule():
    text = LayoutConfig(cluster_size=4, scan_schedule="alternating").describe((14, 14))
    assert text.startswith("4x4 clusters of (4, 4, 4, 2) patches on a 14x14 grid") and "alternating" in text
    assert "3x3 clusters of (5, 5, 4)" in LayoutConfig(cluster_size=4, grid=(12, 12)).describe((14, 14))
    assert LayoutConfig().describe((4, 4)).startswith("single-patch clusters")
