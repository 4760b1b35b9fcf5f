"""Token layouts: every permutation between the image grid and the serialized sequence.

An image of ``H x W`` pixels with patch size ``p`` gives a grid of ``Gh x Gw`` patches; the
*raster index* of the patch in row ``h``, column ``w`` is ``h * Gw + w``.  MAL groups the grid
into rectangular clusters (``k x k`` squares, the last row/column of clusters smaller when the
grid is not a multiple of ``k``) and serializes the tokens cluster after cluster.  The order has
two parts (docs/DESIGN.md, 'Token layout and clusters'):

* the **cluster order** (which cluster comes next): ``row``, ``row_backward``, ``column``,
  ``column_backward`` or ``random`` (a fresh permutation of clusters per sample);
* the **within-cluster order** (how the tokens of one cluster are laid out): ``row``,
  ``column``, ``row_backward`` (row-major reversed), ``column_backward`` (column-major reversed).

The tokens of one cluster are always contiguous.  The sequence is partitioned into prediction
**units** (``cluster``, ``patch-span`` or ``pixel``) that the pretraining task predicts together.

Conventions used throughout:

* ``order[i]`` is the raster index of sequence position ``i`` (so ``x_seq = x_raster[:, order]``);
* ``inverse[j]`` is the sequence position of raster index ``j``;
* cluster and unit ids are numbered in *prediction order*, so they are non-decreasing along the
  sequence: ``0, 0, ..., 1, 1, ..., K - 1``.

Index tensors are int64 and live on the CPU unless a device is asked for; tensors returned by the
cached layout properties are shared, do not modify them in place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property

import torch
import torch._guards
from torch import Tensor

CLUSTER_ORDERS = ("row", "row_backward", "column", "column_backward", "random")
WITHIN_ORDERS = ("row", "column", "row_backward", "column_backward")
UNITS = ("cluster", "patch-span", "pixel")
#: Within-cluster orders cycled over the block pairs by the ``alternating`` scan schedule.
ALTERNATING_SCHEDULE = ("row", "column", "row_backward", "column_backward")
#: Pretrain mode: a token sees its whole unit (``full``) or only the tokens before it in its block's scan.
WITHIN_CLUSTER = ("full", "causal")
#: Fine-tune mode: the ViL cell (``causal``) or the cluster cell (a token reads the state at its cluster's end).
FINETUNE_CELLS = ("causal", "cluster")
#: The layout options that pick a cluster shape (see :meth:`LayoutConfig.merged`).
_SHAPE_KEYS = ("cluster_size", "cluster_grid", "grid")


def _check_choice(value: object, choices: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(choices)}")
    return value


def _check_patch_span_order(cluster_order: str) -> None:
    if cluster_order != "row":
        raise ValueError(
            f"unit 'patch-span' uses runs of the raster order; cluster order must be 'row', got {cluster_order!r}"
        )


# ----------------------------------------------------------------------------------------------
# the layout config
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutConfig:
    """A model's token layout (docs/DESIGN.md, 'Token layout and clusters'), the one owner of these options: nested as
    ``layout`` in every encoder config, validated here once, and stored with the weights (a model loaded with another
    layout is an error).

    Attributes:
        cluster_size: ``k``, patches per cluster side; clusters tile ``grid`` from the top-left, the last row and
            column of clusters smaller when ``k`` does not divide it.
        cluster_grid: clusters per side with near-equal extents (14 patches in 3 -> 5, 5, 4). At most one of
            ``cluster_size`` and ``cluster_grid``; neither means single-patch clusters.
        grid: the patch grid ``(Gh, Gw)`` the clusters are laid on; ``None`` until a model is built (then its own
            grid). At any other grid the model keeps the *cluster grid* it has here, with near-equal extents
            (pretrained at 192 px in 3x3 clusters of 4 -> 3x3 clusters of 5, 5, 4 at 224 px; docs/DESIGN.md,
            'Resolution change and the cluster grid').
        cluster_order: prediction order of the clusters, one of :data:`CLUSTER_ORDERS`.
        scan_schedule: the within-cluster order of each block pair: ``fixed:<order>``, ``alternating``, or one of
            :data:`WITHIN_ORDERS` per pair (see :func:`parse_schedule`).
        unit: prediction unit, one of :data:`UNITS`; ``span`` (tokens) or ``ratio`` (share of the tokens) size a
            ``patch-span`` unit.
        within_cluster: pretrain mode, one of :data:`WITHIN_CLUSTER`.
        finetune_cell: fine-tune mode, one of :data:`FINETUNE_CELLS`.
        seed: base seed of ``random`` cluster orders.
    """

    cluster_size: int | None = None
    cluster_grid: int | None = None
    grid: tuple[int, int] | None = None
    cluster_order: str = "row"
    scan_schedule: str | tuple[str, ...] = "fixed:row"
    unit: str = "cluster"
    span: int | None = None
    ratio: float | None = None
    within_cluster: str = "full"
    finetune_cell: str = "causal"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.scan_schedule, list | tuple):
            object.__setattr__(self, "scan_schedule", tuple(self.scan_schedule))
        if self.grid is not None:
            grid = tuple(self.grid)
            if len(grid) != 2 or not all(isinstance(g, int) and g >= 1 for g in grid):
                raise ValueError(f"layout grid must be two positive ints (Gh, Gw), got {self.grid!r}")
            object.__setattr__(self, "grid", grid)
        _check_choice(self.cluster_order, CLUSTER_ORDERS, "cluster order")
        _check_choice(self.unit, UNITS, "prediction unit")
        _check_choice(self.within_cluster, WITHIN_CLUSTER, "within_cluster")
        _check_choice(self.finetune_cell, FINETUNE_CELLS, "finetune_cell")
        check_schedule(self.scan_schedule)
        size, cgrid = self.cluster_size, self.cluster_grid
        if size is not None and cgrid is not None:
            raise ValueError("give at most one of cluster_size and cluster_grid")
        if size is not None and size < 1:
            raise ValueError(f"cluster size must be >= 1, got {size}")
        if cgrid is not None and cgrid < 1:
            raise ValueError(f"cluster grid must be >= 1, got {cgrid}")
        if self.unit in ("patch-span", "pixel") and (cgrid is not None or size not in (None, 1)):
            got = f"cluster_size={size}" if cgrid is None else f"cluster_grid={cgrid}"
            raise ValueError(f"unit {self.unit!r} uses single-token clusters (cluster size 1); got {got}")
        if self.unit == "patch-span":
            _check_patch_span_order(self.cluster_order)
            if (self.span is None) == (self.ratio is None):
                raise ValueError("unit 'patch-span' needs exactly one of span and ratio")
            if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
                raise ValueError(f"span ratio must be in (0, 1], got {self.ratio}")
            if self.span is not None and self.span < 1:
                raise ValueError(f"patch-span span must be >= 1, got {self.span}")
        elif self.span is not None or self.ratio is not None:
            raise ValueError(f"span/ratio only apply to unit 'patch-span', not {self.unit!r}")

    # -- derived configs ---------------------------------------------------------------------------

    def resolved(self, grid: tuple[int, int]) -> LayoutConfig:
        """This layout with ``grid`` filled in (a model's own patch grid) when it has none; validated on it."""
        out = self if self.grid is not None else replace(self, grid=tuple(grid))
        out.build(*out.grid)  # the checks that need a grid (a cluster larger than the grid, ...)
        return out

    def merged(self, overrides: Mapping[str, object] | LayoutConfig | None) -> LayoutConfig:
        """This layout with ``overrides`` (a mapping of fields, or a whole config) applied.

        A new cluster shape replaces the old one: setting ``cluster_size`` or ``cluster_grid`` clears the other and
        ``grid`` unless ``overrides`` sets them too (``{"cluster_size": 2}`` on a preset with a cluster grid gives
        2x2 clusters on the model's own grid).
        """
        if overrides is None:
            return self
        if isinstance(overrides, LayoutConfig):
            return overrides
        if not isinstance(overrides, Mapping):
            raise ValueError(f"layout overrides must be a mapping of layout options, got {type(overrides).__name__}")
        valid = [f.name for f in fields(LayoutConfig)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"unknown layout option(s) {', '.join(map(str, unknown))}; valid: {', '.join(valid)}")
        changes = dict(overrides)
        if "cluster_size" in changes or "cluster_grid" in changes:
            changes = {**dict.fromkeys(_SHAPE_KEYS), **changes}
        return replace(self, **changes)

    def schedule(self, num_pairs: int) -> list[str]:
        """The within-cluster order of each of ``num_pairs`` block pairs (:func:`parse_schedule`)."""
        return parse_schedule(self.scan_schedule, num_pairs)

    def build(self, grid_h: int, grid_w: int, within_order: str = "row") -> ClusterLayout:
        """The :class:`ClusterLayout` on a ``grid_h x grid_w`` patch grid *as if it were* :attr:`grid` (the cluster
        size tiles it). Models use :meth:`at_grid`, which keeps the cluster grid at other grids."""
        _check_choice(within_order, WITHIN_ORDERS, "within-cluster order")
        size, cgrid = self.cluster_size, self.cluster_grid
        if size is None and cgrid is None:
            size = 1
        if size is not None and size > min(grid_h, grid_w):
            raise ValueError(f"cluster size {size} is larger than the {grid_h}x{grid_w} patch grid")
        if cgrid is not None and cgrid > min(grid_h, grid_w):
            raise ValueError(
                f"cluster grid {cgrid} must be between 1 and the smaller side of the {grid_h}x{grid_w} patch grid"
            )
        num_tokens = grid_h * grid_w
        span = self.span
        if self.unit == "patch-span":
            if self.ratio is not None:
                span = span_for_ratio(self.ratio, num_tokens)
            elif not 1 <= span <= num_tokens:
                raise ValueError(f"patch-span span must be in [1, {num_tokens}], got {span}")
        return ClusterLayout(
            grid_h=grid_h,
            grid_w=grid_w,
            row_spans=tuple(cluster_spans(grid_h, cluster_size=size, cluster_grid=cgrid)),
            col_spans=tuple(cluster_spans(grid_w, cluster_size=size, cluster_grid=cgrid)),
            cluster_order=self.cluster_order,
            within_order=within_order,
            unit=self.unit,
            span=span,
            seed=self.seed,
            ratio=self.ratio,
        )

    def at_grid(self, grid: tuple[int, int], within_order: str = "row") -> ClusterLayout:
        """The layout a model uses on patch grid ``grid``: built on :attr:`grid` (``grid`` itself when unset), then
        carried to ``grid`` keeping the cluster grid (:meth:`ClusterLayout.with_grid`; the cluster order, ``random``
        included, is kept: fine-tuning reads ``random`` as ``row`` by itself)."""
        base = self.build(*(self.grid or grid), within_order=within_order)
        if (base.grid_h, base.grid_w) == tuple(grid):
            return base
        return replace(base.with_grid(*grid), cluster_order=self.cluster_order)  # random stays random here

    # -- identity ----------------------------------------------------------------------------------

    def signature(self, grid: tuple[int, int], num_pairs: int) -> tuple:
        """What decides the token order a model computes with at patch grid ``grid``: the clusters, their order,
        units and every pair's scan, and both cell options (not the seed of random orders). Two layouts with the
        same signature serialize the tokens identically."""
        base = self.at_grid(grid)
        return (
            base.row_spans, base.col_spans, base.cluster_order, base.unit, base.span,
            tuple(self.schedule(num_pairs)), self.within_cluster, self.finetune_cell,
        )  # fmt: skip

    def describe(self, grid: tuple[int, int] | None = None) -> str:
        """One line for messages, e.g. ``3x3 clusters of (4, 4, 4) patches on a 12x12 grid, row order, alternating
        schedule``; at ``grid`` (default: :attr:`grid`) when one is known."""
        grid = grid or self.grid
        if grid is None:
            shape = (
                f"clusters of {self.cluster_size}x{self.cluster_size} patches" if self.cluster_size
                else f"{self.cluster_grid}x{self.cluster_grid} clusters" if self.cluster_grid
                else "single-patch clusters"
            )  # fmt: skip
        else:
            try:
                lay = self.at_grid(grid)
            except ValueError as e:
                return f"invalid layout ({e})"
            kh, kw = lay.cluster_grid
            if max(lay.row_spans) == 1 and max(lay.col_spans) == 1:
                shape = f"single-patch clusters on a {grid[0]}x{grid[1]} grid"
            else:
                spans = lay.row_spans if lay.row_spans == lay.col_spans else (lay.row_spans, lay.col_spans)
                shape = f"{kh}x{kw} clusters of {spans} patches on a {grid[0]}x{grid[1]} grid"
        schedule = self.scan_schedule if isinstance(self.scan_schedule, str) else ",".join(self.scan_schedule)
        parts = [shape, f"{self.cluster_order} cluster order", f"scan schedule {schedule}", f"unit {self.unit}"]
        if self.unit == "patch-span":
            parts[-1] += f" ({'span ' + str(self.span) if self.span else 'ratio ' + str(self.ratio)})"
        if self.within_cluster != "full":
            parts.append(f"within_cluster {self.within_cluster}")
        if self.finetune_cell != "causal":
            parts.append(f"finetune_cell {self.finetune_cell}")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        """Plain builtins (JSON / YAML); :meth:`from_dict` is its inverse."""
        out = asdict(self)
        for key in ("grid", "scan_schedule"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> LayoutConfig:
        return cls().merged(dict(data)) if data else cls()


# ----------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------


def grid_size(image_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid ``(Gh, Gw)`` of an image of ``image_size`` (``S`` or ``(H, W)``) pixels.

    Raises ``ValueError`` naming the sizes when ``H`` or ``W`` is not a multiple of ``patch_size``.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if patch_size < 1:
        raise ValueError(f"patch size must be >= 1, got {patch_size}")
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch_size}")
    return h // patch_size, w // patch_size


def cluster_spans(n: int, *, cluster_size: int | None = None, cluster_grid: int | None = None) -> list[int]:
    """Split ``n`` patches along one axis into cluster extents.

    Give exactly one of:

    * ``cluster_size=k``: tile from the start, the last cluster smaller when ``n % k != 0``
      (``n=14, k=4 -> [4, 4, 4, 2]``);
    * ``cluster_grid=g``: ``g`` near-equal clusters, the larger ones first
      (``n=14, g=3 -> [5, 5, 4]``; ``n=12, g=3 -> [4, 4, 4]``).
    """
    if n < 1:
        raise ValueError(f"cannot split {n} patches into clusters")
    if (cluster_size is None) == (cluster_grid is None):
        raise ValueError("give exactly one of cluster_size and cluster_grid")
    if cluster_size is not None:
        if cluster_size < 1:
            raise ValueError(f"cluster size must be >= 1, got {cluster_size}")
        if cluster_size > n:
            raise ValueError(f"cluster size {cluster_size} is larger than the {n} patches along this axis")
        full, rest = divmod(n, cluster_size)
        return [cluster_size] * full + ([rest] if rest else [])
    assert cluster_grid is not None
    if cluster_grid < 1:
        raise ValueError(f"cluster grid must be >= 1, got {cluster_grid}")
    if cluster_grid > n:
        raise ValueError(f"cluster grid {cluster_grid} has more clusters than the {n} patches along this axis")
    base, extra = divmod(n, cluster_grid)
    return [base + 1] * extra + [base] * (cluster_grid - extra)


def span_for_ratio(ratio: float, num_tokens: int) -> int:
    """Tokens per ``patch-span`` unit for a masking ratio: ``max(1, floor(ratio * L))``.

    A ``1e-9`` tolerance absorbs float error (``0.29 * 100`` is ``28.999...`` in floating point).
    144 tokens: ratios 0.01, 0.1, 0.2, 0.3, 0.5, 0.7 give 1, 14, 28, 43, 72, 100.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"span ratio must be in (0, 1], got {ratio}")
    return max(1, math.floor(ratio * num_tokens + 1e-9))


# ----------------------------------------------------------------------------------------------
# permutation helpers
# ----------------------------------------------------------------------------------------------


def keep_before_last_unit(unit_ids: Tensor) -> int | None:
    """How many canonical positions come before the last prediction unit, when skipping it is exact: ``unit_ids``
    ``(B or 1, L)`` non-decreasing, the last unit of the same size in every row and not the whole sequence. None
    otherwise. Pretraining skips the last unit, whose outputs nothing reads (``drop_last_unit``)."""
    n_last = (unit_ids == unit_ids[:, -1:]).sum(dim=1)
    if not bool((n_last == n_last[0]).all()) or int(n_last[0]) == unit_ids.shape[1]:
        return None
    return unit_ids.shape[1] - int(n_last[0])


def invert_permutation(perm: Tensor) -> Tensor:
    """Inverse of a permutation along the last dimension: ``inv[..., perm[..., i]] = i``.

    ``perm``: LongTensor ``(..., L)`` -> LongTensor ``(..., L)``.
    """
    length = perm.shape[-1]
    positions = torch.arange(length, device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, positions)


def _within_key(raster: Tensor, grid_h: int, grid_w: int, within_order: str) -> Tensor:
    """A key in ``[0, L)`` whose ascending order inside any rectangle is ``within_order``."""
    num_tokens = grid_h * grid_w
    column_major = (raster % grid_w) * grid_h + raster // grid_w
    key = raster if within_order in ("row", "row_backward") else column_major
    if within_order.endswith("_backward"):
        key = (num_tokens - 1) - key
    return key


def _sort_tokens(cell_rank: Tensor, grid_h: int, grid_w: int, within_order: str) -> tuple[Tensor, Tensor]:
    """Serialize cells given the prediction-order cluster index of every cell.

    ``cell_rank``: LongTensor ``(B, L)``, the cluster index (in prediction order) of each raster
    cell.  Returns ``order`` and ``cluster_ids``, both ``(B, L)``: cells sorted by cluster, then by
    the within-cluster order.
    """
    num_tokens = grid_h * grid_w
    raster = torch.arange(num_tokens, device=cell_rank.device)
    key = cell_rank * num_tokens + _within_key(raster, grid_h, grid_w, within_order)
    sorted_key, order = torch.sort(key, dim=1, stable=True)
    return order, sorted_key // num_tokens


# ----------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Scan:
    """Per-sample realisation of a layout for one batch.

    Attributes:
        order: LongTensor ``(B, L)``, raster index of each sequence position.
        cluster_ids: LongTensor ``(B, L)``, prediction-order cluster index of each sequence
            position (non-decreasing along each row).
        unit_ids: LongTensor ``(B, L)``, prediction-unit id of each sequence position
            (non-decreasing along each row).
        grid_h, grid_w: the patch grid, ``L = grid_h * grid_w``.

    The tensors may be expanded views (fixed orders share one row); do not modify them in place.
    """

    order: Tensor
    cluster_ids: Tensor
    unit_ids: Tensor
    grid_h: int
    grid_w: int

    def __post_init__(self) -> None:
        expected = self.grid_h * self.grid_w
        for name in ("order", "cluster_ids", "unit_ids"):
            t = getattr(self, name)
            if t.dim() != 2 or t.shape[1] != expected or t.shape != self.order.shape:
                raise ValueError(
                    f"Scan.{name} must have shape (B, {expected}) for a {self.grid_h}x{self.grid_w} grid, "
                    f"got {tuple(t.shape)}"
                )

    @property
    def batch_size(self) -> int:
        return self.order.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.order.shape[1]

    @property
    def inverse(self) -> Tensor:
        """LongTensor ``(B, L)``: sequence position of each raster index."""
        return invert_permutation(self.order)

    def _check_grid(self, grid_h: int | None, grid_w: int | None) -> None:
        if (grid_h, grid_w) != (None, None) and (grid_h, grid_w) != (self.grid_h, self.grid_w):
            raise ValueError(f"scan is for a {self.grid_h}x{self.grid_w} grid, not {grid_h}x{grid_w}")

    def _to_grid(self, values: Tensor) -> Tensor:
        out = torch.empty_like(self.order).scatter_(1, self.order, values)
        return out.view(self.batch_size, self.grid_h, self.grid_w)

    def grid_cluster_ids(self, grid_h: int | None = None, grid_w: int | None = None) -> Tensor:
        """LongTensor ``(B, grid_h, grid_w)``: prediction-order cluster index of every grid cell."""
        self._check_grid(grid_h, grid_w)
        return self._to_grid(self.cluster_ids)

    def grid_unit_ids(self, grid_h: int | None = None, grid_w: int | None = None) -> Tensor:
        """LongTensor ``(B, grid_h, grid_w)``: prediction-unit id of every grid cell."""
        self._check_grid(grid_h, grid_w)
        return self._to_grid(self.unit_ids)

    def _within_name(self, layout_or_within_order: ClusterLayout | str) -> str:
        if isinstance(layout_or_within_order, ClusterLayout):
            layout = layout_or_within_order
            if (layout.grid_h, layout.grid_w) != (self.grid_h, self.grid_w):
                raise ValueError(
                    f"layout is for a {layout.grid_h}x{layout.grid_w} grid, the scan for {self.grid_h}x{self.grid_w}"
                )
            return layout.within_order
        return _check_choice(layout_or_within_order, WITHIN_ORDERS, "within-cluster order")

    def within_perm(self, layout_or_within_order: ClusterLayout | str) -> Tensor:
        """Permutation to another within-cluster order, keeping the cluster sequence.

        Returns ``perm``: LongTensor ``(B, L)`` with ``new.order == self.order.gather(1, perm)``,
        i.e. ``perm[b, i]`` is the position in *this* sequence of the token at position ``i`` of the
        new one.  ``serialize(x, perm)`` takes features from this order to the new one and
        ``unserialize(x_new, perm)`` takes them back.  ``perm`` only moves tokens inside their
        cluster; the positions of each cluster are unchanged.
        """
        within_order = self._within_name(layout_or_within_order)
        num_tokens = self.num_tokens
        key = self.cluster_ids * num_tokens + _within_key(self.order, self.grid_h, self.grid_w, within_order)
        return torch.sort(key, dim=1, stable=True).indices

    def within(self, layout_or_within_order: ClusterLayout | str) -> Scan:
        """The same cluster sequence with another within-cluster order (see :meth:`within_perm`)."""
        return self.within_with_perm(layout_or_within_order)[0]

    def within_with_perm(self, layout_or_within_order: ClusterLayout | str) -> tuple[Scan, Tensor]:
        """:meth:`within` and :meth:`within_perm` in one call: ``(scan, perm)``."""
        perm = self.within_perm(layout_or_within_order)
        scan = Scan(
            order=self.order.gather(1, perm),
            cluster_ids=self.cluster_ids.gather(1, perm),
            unit_ids=self.unit_ids.gather(1, perm),
            grid_h=self.grid_h,
            grid_w=self.grid_w,
        )
        return scan, perm

    def to(self, device: torch.device | str) -> Scan:
        return Scan(
            self.order.to(device),
            self.cluster_ids.to(device),
            self.unit_ids.to(device),
            self.grid_h,
            self.grid_w,
        )


@dataclass(frozen=True)
class ClusterLayout:
    """How a ``grid_h x grid_w`` patch grid is clustered, ordered and split into prediction units.

    Attributes:
        grid_h, grid_w: patch grid; ``L = grid_h * grid_w`` tokens.
        row_spans, col_spans: cluster extents along H and W (``Kh = len(row_spans)`` by
            ``Kw = len(col_spans)`` clusters; cluster ``(a, b)`` covers rows
            ``sum(row_spans[:a]) ...`` and columns ``sum(col_spans[:b]) ...``).
        cluster_order: one of :data:`CLUSTER_ORDERS`.
        within_order: one of :data:`WITHIN_ORDERS`.
        unit: one of :data:`UNITS`.
        span: tokens per unit for ``unit="patch-span"`` (the last unit is shorter when ``L`` is not
            a multiple), ``None`` otherwise.
        seed: base seed for ``random`` orders (see :meth:`make_generator`).
        ratio: the masking ratio ``span`` was derived from, if any (kept by :meth:`with_grid`).

    Use :meth:`build` rather than the constructor.  For ``cluster_order="random"`` the cached
    properties describe the ``row`` cluster order (the fine-tuning fallback); per-sample orders
    come from :meth:`draw`.
    """

    grid_h: int
    grid_w: int
    row_spans: tuple[int, ...]
    col_spans: tuple[int, ...]
    cluster_order: str = "row"
    within_order: str = "row"
    unit: str = "cluster"
    span: int | None = None
    seed: int = 0
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.grid_h < 1 or self.grid_w < 1:
            raise ValueError(f"patch grid must be positive, got {self.grid_h}x{self.grid_w}")
        object.__setattr__(self, "row_spans", tuple(int(s) for s in self.row_spans))
        object.__setattr__(self, "col_spans", tuple(int(s) for s in self.col_spans))
        for name, spans, n in (
            ("row_spans", self.row_spans, self.grid_h),
            ("col_spans", self.col_spans, self.grid_w),
        ):
            if not spans or min(spans) < 1 or sum(spans) != n:
                raise ValueError(f"{name} {spans} must be positive and sum to {n}")
        _check_choice(self.cluster_order, CLUSTER_ORDERS, "cluster order")
        _check_choice(self.within_order, WITHIN_ORDERS, "within-cluster order")
        _check_choice(self.unit, UNITS, "prediction unit")
        single = max(self.row_spans) == 1 and max(self.col_spans) == 1
        if self.unit in ("patch-span", "pixel") and not single:
            raise ValueError(f"unit {self.unit!r} needs single-patch clusters (cluster size 1)")
        if self.unit == "patch-span":
            _check_patch_span_order(self.cluster_order)
            if self.span is None or not 1 <= self.span <= self.num_tokens:
                raise ValueError(f"patch-span span must be in [1, {self.num_tokens}], got {self.span}")
            if self.ratio is not None and self.span != span_for_ratio(self.ratio, self.num_tokens):
                raise ValueError(f"span {self.span} does not match ratio {self.ratio} of {self.num_tokens} tokens")
        elif self.span is not None or self.ratio is not None:
            raise ValueError(f"span/ratio only apply to unit 'patch-span', not {self.unit!r}")

    @classmethod
    def build(
        cls,
        grid_h: int,
        grid_w: int,
        *,
        cluster_size: int | None = None,
        cluster_grid: int | None = None,
        cluster_order: str = "row",
        within_order: str = "row",
        unit: str = "cluster",
        span: int | None = None,
        ratio: float | None = None,
        seed: int = 0,
    ) -> ClusterLayout:
        """Build a validated layout on a ``grid_h x grid_w`` patch grid.

        Args:
            grid_h, grid_w: patch grid.
            cluster_size: ``k``, patches per cluster side (ragged last clusters allowed).
            cluster_grid: ``g``, clusters per side with near-equal extents.  At most one of the two;
                neither means ``cluster_size=1``.
            cluster_order, within_order: see :data:`CLUSTER_ORDERS`, :data:`WITHIN_ORDERS`.
            unit: ``cluster`` (default), ``patch-span`` (runs of ``span`` raster tokens; cluster size
                1 and cluster order ``row``) or ``pixel`` (single tokens; cluster size 1; the caller
                uses patch size 1).
            span, ratio: for ``patch-span`` only, exactly one: ``span`` tokens per unit or a masking
                ratio ``r`` in ``(0, 1]`` giving ``span = max(1, floor(r * L))``.
            seed: base seed for ``random`` cluster orders.

        The options are checked by :class:`LayoutConfig`, which models use (:meth:`LayoutConfig.at_grid`).
        """
        cfg = LayoutConfig(
            cluster_size=cluster_size, cluster_grid=cluster_grid, cluster_order=cluster_order, unit=unit, span=span,
            ratio=ratio, seed=seed,
        )  # fmt: skip
        return cfg.build(grid_h, grid_w, within_order)

    @classmethod
    def for_image(cls, image_size: int | tuple[int, int], patch_size: int, **kwargs: object) -> ClusterLayout:
        """:meth:`build` on the patch grid of an image (``grid_size(image_size, patch_size)``)."""
        return cls.build(*grid_size(image_size, patch_size), **kwargs)  # type: ignore[arg-type]

    # -- sizes ------------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """``L = grid_h * grid_w``."""
        return self.grid_h * self.grid_w

    @property
    def cluster_grid(self) -> tuple[int, int]:
        """``(Kh, Kw)``: clusters per column and per row of the grid."""
        return len(self.row_spans), len(self.col_spans)

    @property
    def num_clusters(self) -> int:
        """``K = Kh * Kw``."""
        return len(self.row_spans) * len(self.col_spans)

    @property
    def num_units(self) -> int:
        """Number of prediction units (``K``, or ``ceil(L / span)`` for ``patch-span``)."""
        if self.unit == "patch-span":
            assert self.span is not None
            return -(-self.num_tokens // self.span)
        return self.num_clusters

    # -- cached index tensors ---------------------------------------------------------------------

    @cached_property
    def _cell_cluster(self) -> Tensor:
        """LongTensor ``(L,)``: row-major cluster index ``a * Kw + b`` of each raster cell."""
        kh, kw = self.cluster_grid
        row_of = torch.repeat_interleave(torch.arange(kh), torch.tensor(self.row_spans))
        col_of = torch.repeat_interleave(torch.arange(kw), torch.tensor(self.col_spans))
        return (row_of[:, None] * kw + col_of[None, :]).reshape(-1)

    @cached_property
    def _cluster_rank(self) -> Tensor:
        """LongTensor ``(K,)``: prediction position of each row-major cluster (fixed order)."""
        kh, kw = self.cluster_grid
        a = torch.arange(kh)[:, None].expand(kh, kw)
        b = torch.arange(kw)[None, :].expand(kh, kw)
        order = "row" if self.cluster_order == "random" else self.cluster_order
        if order == "row":
            rank = a * kw + b
        elif order == "row_backward":
            rank = a * kw + (kw - 1 - b)
        elif order == "column":
            rank = b * kh + a
        else:  # column_backward
            rank = b * kh + (kh - 1 - a)
        return rank.reshape(-1)

    @cached_property
    def _fixed(self) -> tuple[Tensor, Tensor]:
        cell_rank = self._cluster_rank[self._cell_cluster][None]
        order, cluster_ids = _sort_tokens(cell_rank, self.grid_h, self.grid_w, self.within_order)
        return order[0], cluster_ids[0]

    @cached_property
    def order(self) -> Tensor:
        """LongTensor ``(L,)``: raster index (``h * grid_w + w``) of each sequence position."""
        return self._fixed[0]

    @cached_property
    def inverse(self) -> Tensor:
        """LongTensor ``(L,)``: sequence position of each raster index."""
        return invert_permutation(self.order)

    @cached_property
    def cluster_ids(self) -> Tensor:
        """LongTensor ``(L,)``: prediction-order cluster index of each sequence position."""
        return self._fixed[1]

    @cached_property
    def unit_ids(self) -> Tensor:
        """LongTensor ``(L,)``: prediction-unit id of each sequence position.

        Equal to :attr:`cluster_ids` for ``cluster``/``pixel``; ``arange(L) // span`` for
        ``patch-span``.
        """
        if self.unit == "patch-span":
            assert self.span is not None
            return torch.arange(self.num_tokens) // self.span
        return self.cluster_ids

    @cached_property
    def cluster_sizes(self) -> Tensor:
        """LongTensor ``(K,)``: tokens per cluster, in prediction order."""
        return torch.bincount(self.cluster_ids, minlength=self.num_clusters)

    @cached_property
    def cluster_bounds(self) -> Tensor:
        """LongTensor ``(K + 1,)``: start offset of each cluster in the sequence, then ``L``."""
        return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(self.cluster_sizes, 0)])

    @cached_property
    def unit_sizes(self) -> Tensor:
        """LongTensor ``(num_units,)``: tokens per prediction unit, in prediction order."""
        return torch.bincount(self.unit_ids, minlength=self.num_units)

    @cached_property
    def grid_cluster_ids(self) -> Tensor:
        """LongTensor ``(grid_h, grid_w)``: prediction-order cluster index of every grid cell."""
        return self._cluster_rank[self._cell_cluster].view(self.grid_h, self.grid_w)

    @cached_property
    def grid_unit_ids(self) -> Tensor:
        """LongTensor ``(grid_h, grid_w)``: prediction-unit id of every grid cell."""
        out = torch.empty_like(self.unit_ids).scatter_(0, self.order, self.unit_ids)
        return out.view(self.grid_h, self.grid_w)

    # -- derived layouts --------------------------------------------------------------------------

    def with_within_order(self, within_order: str) -> ClusterLayout:
        """Same clusters and cluster order, another within-cluster order."""
        _check_choice(within_order, WITHIN_ORDERS, "within-cluster order")
        return replace(self, within_order=within_order)

    def with_grid(self, grid_h: int, grid_w: int) -> ClusterLayout:
        """The layout for another patch grid (fine-tuning at a new resolution).

        Keeps the cluster grid ``(Kh, Kw)`` with near-equal spans (12x12 in 3x3 clusters of 4 ->
        14x14 with spans ``(5, 5, 4)``), so the number of clusters and their order stay the same.
        Single-patch clusters (cluster size 1, and the ``patch-span``/``pixel`` units) stay single
        patches.  A ``random`` cluster order becomes ``row``.  ``patch-span`` recomputes the span
        from the ratio if one was given, else keeps the span.
        """
        if grid_h < 1 or grid_w < 1:
            raise ValueError(f"patch grid must be positive, got {grid_h}x{grid_w}")
        kh, kw = self.cluster_grid
        if max(self.row_spans) == 1 and max(self.col_spans) == 1:
            row_spans, col_spans = (1,) * grid_h, (1,) * grid_w
        else:
            if kh > grid_h or kw > grid_w:
                raise ValueError(f"cannot keep the {kh}x{kw} cluster grid on a {grid_h}x{grid_w} patch grid")
            row_spans = tuple(cluster_spans(grid_h, cluster_grid=kh))
            col_spans = tuple(cluster_spans(grid_w, cluster_grid=kw))
        span = self.span
        if self.unit == "patch-span" and self.ratio is not None:
            span = span_for_ratio(self.ratio, grid_h * grid_w)
        return replace(
            self,
            grid_h=grid_h,
            grid_w=grid_w,
            row_spans=row_spans,
            col_spans=col_spans,
            cluster_order="row" if self.cluster_order == "random" else self.cluster_order,
            span=span,
        )

    # -- per-sample scans -------------------------------------------------------------------------

    def make_generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded with ``seed + offset`` (e.g. ``offset`` = step or epoch)."""
        return torch.Generator().manual_seed(self.seed + offset)

    def draw(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Scan:
        """Per-sample scan of a batch.

        Fixed cluster orders: :attr:`order`, :attr:`cluster_ids`, :attr:`unit_ids` expanded to
        ``(B, L)`` (views).  ``random``: an independent random permutation of the clusters per
        sample (tokens of a cluster stay contiguous, in the configured within-cluster order), drawn
        from ``generator`` (a CPU generator; ``None`` = torch's global RNG), so deterministic given
        the generator.  With ragged clusters the per-sample ``cluster_ids`` differ.
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if self.cluster_order == "random":
            rank = torch.argsort(torch.rand(batch_size, self.num_clusters, generator=generator), dim=1)
            order, cluster_ids = _sort_tokens(rank[:, self._cell_cluster], self.grid_h, self.grid_w, self.within_order)
            # patch-span is never random, so units are clusters here
            order, cluster_ids = order.to(device), cluster_ids.to(device)
            return Scan(order, cluster_ids, cluster_ids, self.grid_h, self.grid_w)

        def rows(t: Tensor) -> Tensor:
            return t.to(device).unsqueeze(0).expand(batch_size, -1)

        return Scan(rows(self.order), rows(self.cluster_ids), rows(self.unit_ids), self.grid_h, self.grid_w)


class LayoutOwner:
    """Mixin of the encoders: the layout of ``self.cfg.layout`` (a :class:`LayoutConfig` whose ``grid`` is set) at
    any patch grid, in canonical order, i.e. the within-cluster order of the last scan in ``self.schedule``."""

    cfg: object
    schedule: list[str]

    @property
    def layout(self) -> ClusterLayout:
        """Cluster layout at the configured resolution, in canonical order."""
        return self.layout_for(self.cfg.grid)

    def layout_for(self, grid: tuple[int, int]) -> ClusterLayout:
        """Layout for a patch grid; a grid other than the layout's own keeps its cluster grid (docs/DESIGN.md,
        'Resolution change and the cluster grid')."""
        layouts: dict[tuple[int, int], ClusterLayout] = self.__dict__.setdefault("_layouts", {})
        grid = tuple(grid)
        if grid not in layouts:
            if torch._guards.detect_fake_mode() is not None:  # tracing: the cached index tensors would be fake
                raise ValueError(
                    f"no layout for a {grid[0]}x{grid[1]} patch grid yet while tracing: export at the model's "
                    "image_size, or run the model once on that input eagerly first"
                )
            with torch.device("cpu"):  # index tensors live on the CPU, also when a model is built on "meta"
                layout = self.cfg.layout.at_grid(grid, self.schedule[-1])
                _ = layout.order, layout.inverse, layout.cluster_ids, layout.unit_ids, layout.grid_unit_ids  # eagerly
            layouts[grid] = layout
        return layouts[grid]

    def draw_scan(
        self, batch_size: int, grid: tuple[int, int] | None = None, generator: torch.Generator | None = None
    ) -> Scan:
        """A per-sample scan for pretraining (a fresh cluster permutation per sample for ``random``)."""
        return self.layout_for(grid or self.cfg.grid).draw(batch_size, generator=generator)


# ----------------------------------------------------------------------------------------------
# scan schedules
# ----------------------------------------------------------------------------------------------


def _schedule_entries(schedule: str | Sequence[str]) -> list[str] | None:
    """The explicit per-pair orders of a schedule, or None for ``alternating`` / ``fixed:<order>`` (checked)."""
    if isinstance(schedule, str):
        text = schedule.strip()
        if text == "alternating":
            return None
        if text.startswith("fixed:"):
            _check_choice(text[len("fixed:") :].strip(), WITHIN_ORDERS, "within-cluster order")
            return None
        if "," not in text:
            raise ValueError(
                f"unknown scan schedule {schedule!r}; use 'fixed:<order>', 'alternating' or a list of "
                f"within-cluster orders (valid orders: {', '.join(WITHIN_ORDERS)})"
            )
        entries = [e.strip() for e in text.split(",")]
    else:
        entries = list(schedule)
    for entry in entries:
        _check_choice(entry, WITHIN_ORDERS, "within-cluster order")
    return entries


def check_schedule(schedule: str | Sequence[str]) -> None:
    """Raise ``ValueError`` for a schedule :func:`parse_schedule` rejects at any depth."""
    _schedule_entries(schedule)


def parse_schedule(schedule: str | Sequence[str], num_pairs: int) -> list[str]:
    """Within-cluster order of each encoder block pair.

    ``"fixed:<order>"``: one order for every pair; ``"alternating"``: cycle
    :data:`ALTERNATING_SCHEDULE` (``row, column, row_backward, column_backward``) over the pairs;
    a sequence of orders (or a comma-separated string) with exactly one entry per pair.
    """
    if num_pairs < 1:
        raise ValueError(f"the encoder needs at least one block pair, got {num_pairs}")
    entries = _schedule_entries(schedule)
    if entries is None:
        text = schedule.strip()
        if text == "alternating":
            return [ALTERNATING_SCHEDULE[i % len(ALTERNATING_SCHEDULE)] for i in range(num_pairs)]
        return [text[len("fixed:") :].strip()] * num_pairs
    if len(entries) != num_pairs:
        raise ValueError(f"scan schedule has {len(entries)} entries but the encoder has {num_pairs} block pairs")
    return entries


# ----------------------------------------------------------------------------------------------
# images <-> patches <-> sequences
# ----------------------------------------------------------------------------------------------


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Images ``(B, C, H, W)`` -> patches ``(B, L, p * p * C)`` in raster order.

    Each patch is flattened as ``(p, p, C)`` (row inside the patch, column, channel; channel
    fastest), the MAE convention.
    """
    if images.dim() != 4:
        raise ValueError(f"patchify expects images (B, C, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    gh, gw = grid_size((h, w), patch_size)
    p = patch_size
    x = images.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid_h: int, grid_w: int, channels: int = 3) -> Tensor:
    """Exact inverse of :func:`patchify`: ``(B, L, p * p * C)`` -> ``(B, C, grid_h * p, grid_w * p)``."""
    p = patch_size
    if patches.dim() != 3 or patches.shape[1:] != (grid_h * grid_w, p * p * channels):
        raise ValueError(
            f"unpatchify expects patches (B, {grid_h * grid_w}, {p * p * channels}) for a "
            f"{grid_h}x{grid_w} grid of {p}x{p}x{channels} patches, got shape {tuple(patches.shape)}"
        )
    b = patches.shape[0]
    x = patches.reshape(b, grid_h, grid_w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, grid_h * p, grid_w * p)


def _batched_order(x: Tensor, order: Tensor) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"expected a sequence (B, L, ...), got shape {tuple(x.shape)}")
    if order.dim() not in (1, 2) or order.shape[-1] != x.shape[1]:
        raise ValueError(f"order must be (L,) or (B, L) with L = {x.shape[1]}, got {tuple(order.shape)}")
    if order.dim() == 2 and order.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"order has batch {order.shape[0]} but the sequence has batch {x.shape[0]}")
    return order


def _expand_index(order: Tensor, x: Tensor) -> Tensor:
    """``(B or 1, L)`` -> an index broadcast to the shape of ``x`` ``(B, L, ...)``."""
    index = order.reshape(order.shape[0], order.shape[1], *([1] * (x.dim() - 2)))
    return index.expand(x.shape[0], order.shape[1], *x.shape[2:])


def canonical_visible(order: Tensor, visible: Tensor) -> Tensor:
    """Visible raster indices ``(B, Lv)`` sorted into the canonical scan ``order`` ``(L,)``."""
    return visible.gather(1, invert_permutation(order)[visible].argsort(dim=1))


def serialize(x_raster: Tensor, order: Tensor) -> Tensor:
    """Raster tokens ``(B, L, ...)`` -> sequence ``(B, L, ...)``: ``out[:, i] = x[:, order[i]]``.

    ``order``: LongTensor ``(L,)`` shared by the batch or ``(B, L)`` per sample.
    """
    order = _batched_order(x_raster, order)
    if order.dim() == 1:
        return x_raster.index_select(1, order)
    return torch.gather(x_raster, 1, _expand_index(order, x_raster))


def unserialize(x_seq: Tensor, order: Tensor) -> Tensor:
    """Inverse of :func:`serialize`: ``out[:, order[i]] = x_seq[:, i]``; shapes as there."""
    order = _batched_order(x_seq, order)
    if order.dim() == 1:
        return x_seq.index_select(1, invert_permutation(order))
    return torch.zeros_like(x_seq).scatter(1, _expand_index(order, x_seq), x_seq)
