"""Vision-LSTM (ViL) encoder, faithful to the official ``VisionLSTM2`` and extended with scan layouts.

The encoder keeps its tokens in one *canonical* serialized order between blocks. Every sequence-mixing operation
works from that order:

* the 3x3 depthwise conv always acts in image space (un-serialize, convolve, re-serialize); the reversed block of
  a pair uses the kernel rotated by 180 degrees, which equals the official "flip the sequence, reshape, convolve"
  for a raster layout;
* the mLSTM cell runs over the block's own scan order: its q/k/v/gates are gathered into that order and the
  result is scattered back. All other operations are per token, so this is exactly "reorder the block input,
  run the layer, restore the order" of docs/DESIGN.md, 'Scan schedules'.

A :class:`BlockPlan` carries what one block needs (scan permutation, kernel segment ids, kernel orientation and
conv validity mask); the encoder builds the plans for a mode ("finetune" or "pretrain") and a patch grid.

Shapes: ``B`` batch, ``L = Gh * Gw`` tokens, ``D`` width, ``I = expansion * D`` inner width, ``NH`` mLSTM heads,
``DH = I / NH``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch._guards
import torch.nn.functional as F
from torch import nn

from mal.kernels import mlstm
from mal.models.base import EncoderClassifier, EncoderConfig, LayoutRecorded, default_pretrained_cfg
from mal.models.layers import (
    BlockDiagonalLinear,
    DropPath,
    MultiHeadNorm,
    OffsetLayerNorm,
    PatchEmbed,
    PosEmbed2d,
    small_init_,
    wang_init_,
)
from mal.runtime import retain_freed_memory
from mal.tokens import LayoutOwner, Scan, canonical_visible, keep_before_last_unit, serialize, unserialize

MODES = ("finetune", "pretrain")


@dataclass
class ViLConfig(EncoderConfig):
    """Everything that defines a ViL encoder (and its classification head): the shared fields of
    :class:`~mal.models.base.EncoderConfig` (``depth`` counts block pairs, each a forward and a backward mLSTM block;
    ``layout`` the token layout) and the ViL block's own."""

    family: ClassVar[str] = "vil"

    expansion: int = 2
    num_heads: int = 4  # mLSTM heads
    qkv_block_size: int = 4  # block size of the block-diagonal q/k/v projections
    conv_kernel_size: int = 3
    proj_bias: bool = True
    norm_bias: bool = True
    legacy_norm: bool = False  # extra LayerNorm(2D) after pooling (released official checkpoints)
    backend: str = "auto"  # mLSTM backend, see mal.kernels
    chunk_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        inner = self.expansion * self.dim
        self.check(
            expansion=self.expansion >= 1, num_heads=self.num_heads >= 1 and inner % self.num_heads == 0,
            qkv_block_size=self.qkv_block_size >= 1 and inner % self.qkv_block_size == 0,
            conv_kernel_size=self.conv_kernel_size >= 1, chunk_size=self.chunk_size >= 1,
        )  # fmt: skip

    @property
    def inner(self) -> int:
        return self.expansion * self.dim


@dataclass
class BlockPlan:
    """How one block traverses the canonical sequence.

    perm:        (L,) or (B, L) canonical positions in this block's scan order, or None for the canonical order.
    segment_ids: (L,) or (B, L) non-decreasing segment ids along the scan for the kernel, or None (causal).
    flip_kernel: use the conv kernel rotated by 180 degrees (the block that runs backward in fine-tuning).
    conv_valid:  (1 or B, k*k, Gh, Gw) bool, False where a neighbour must not contribute; None = plain conv.
    reversal:    ``perm`` is ``(L-1, ..., 0)``: reordering is ``flip`` (2-3x faster than a gather on CPU).
    """

    perm: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    flip_kernel: bool = False
    conv_valid: torch.Tensor | None = None
    reversal: bool = False

    def to_scan(self, x: torch.Tensor) -> torch.Tensor:
        """Canonical ``(B, L, ...)`` -> this block's scan order."""
        if self.perm is None:
            return x
        return x.flip(1) if self.reversal else serialize(x, self.perm)

    def from_scan(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_scan`."""
        if self.perm is None:
            return x
        return x.flip(1) if self.reversal else unserialize(x, self.perm)


@dataclass
class SequencePlan:
    """What every block shares for one forward: grid, canonical order and the per-block plans.

    order: (L,) or (B, L) raster index of each canonical sequence position; None for raster order.
    keep:  compute only the first ``keep`` canonical positions (pretraining drops the last unit, whose outputs
           nothing reads); every block's ``perm``/``segment_ids`` then cover those positions only. None: all.
    """

    grid: tuple[int, int]
    order: torch.Tensor | None
    blocks: list[BlockPlan] = field(default_factory=list)
    keep: int | None = None


def depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor | None
) -> torch.Tensor:
    """Depthwise ``k x k`` conv with 'same' zero padding and an optional per-position neighbour mask.

    x: (B, C, H, W); weight: (C, 1, k, k); valid: (1 or B, k*k, H, W) bool or None. A masked neighbour
    contributes zero, exactly as if its value were zero. The masked form is :class:`MaskedDepthwiseConv`.
    """
    C, _, k, _ = weight.shape
    if valid is None:
        return F.conv2d(x, weight, bias, padding=k // 2, groups=C)
    return MaskedDepthwiseConv.apply(x, weight, bias, valid.to(x.dtype))


class MaskedDepthwiseConv(torch.autograd.Function):
    """The masked depthwise conv of the cluster-causal mode, with a hand-written backward.

    ``out = bias + sum_o w_o * mask_o * shift_o(x)`` over the ``k * k`` taps ``o``. Through autograd, every tap's
    slice of the padded input cost a zero-filled padded gradient plus a copy, and the products three more passes
    (a quarter of the pretrain-mode encoder's forward + backward in a profile). Here a mask shared by the batch
    (the usual case) goes into the weights: each tap is one multiply-add with a ``(C, H, W)`` masked weight in the
    memory format of ``x`` (channels-last in the ViL layer, where every operand then runs over whole rows of
    channels), forward and for the input gradient, plus a masked product and its sum for the weight gradient.
    Per-sample masks multiply each tap by its mask first (about twice the passes). Shapes as
    :func:`depthwise_conv`, ``mask`` as a float tensor. The masked taps add exact zeros (a later token cannot change
    an output by even a rounding). Gradients: x, weight, bias (not the mask); no double backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mask):  # noqa: D102 (documented on the class)
        C, _, k, _ = weight.shape
        _, _, H, W = x.shape
        xp = F.pad(x, (k // 2,) * 4)
        wm = _masked_tap_weights(weight, mask, x)
        out = x.new_zeros(()) if bias is None else bias.view(1, C, 1, 1)
        for o in range(k * k):
            dy, dx = divmod(o, k)
            tap = xp[:, :, dy : dy + H, dx : dx + W]
            if wm is None:  # per-sample masks: two passes per tap
                tap, w = tap * mask[:, o : o + 1], weight[:, 0, dy, dx].view(1, C, 1, 1)
            else:
                w = wm[o][None]
            out = torch.addcmul(out, tap, w) if o == 0 else out.addcmul_(tap, w)
        ctx.save_for_backward(xp, weight, mask)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # noqa: D102
        xp, weight, mask = ctx.saved_tensors
        C, _, k, _ = weight.shape
        r = k // 2
        _, _, H, W = g.shape
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        wm = _masked_tap_weights(weight, mask, xp) if need_x else None
        grad_xp = torch.zeros_like(xp) if need_x else None
        grad_w = weight.new_empty(C, k * k) if need_w else None
        for o in range(k * k):
            dy, dx = divmod(o, k)
            tap = xp[:, :, dy : dy + H, dx : dx + W]
            if need_w:  # one reduction over everything but the channels (fast in both memory formats)
                grad_w[:, o] = (g * tap).mul_(mask[:, o : o + 1]).sum((0, 2, 3))
            if need_x:
                if wm is not None:
                    gm, w = g, wm[o][None]
                else:
                    gm, w = g * mask[:, o : o + 1], weight[:, 0, dy, dx].view(1, C, 1, 1)
                grad_xp[:, :, dy : dy + H, dx : dx + W].addcmul_(gm, w)
        grad_x = grad_xp[:, :, r : r + H, r : r + W] if need_x else None
        grad_b = g.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w.view(C, 1, k, k) if need_w else None, grad_b, None


def _masked_tap_weights(weight: torch.Tensor, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """``(k * k, C, H, W)``: tap o's weight times its mask, for a mask ``(1, k * k, H, W)`` shared by the batch (None
    for per-sample masks), in the memory format of ``like`` (channels-last or contiguous)."""
    if mask.shape[0] != 1:
        return None
    C, _, k, _ = weight.shape
    wm = mask[0][:, None] * weight.view(C, k * k).T[:, :, None, None]  # (k * k, C, H, W)
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        wm = wm.contiguous(memory_format=torch.channels_last)
    return wm


def conv_validity(ids: torch.Tensor, k: int) -> torch.Tensor:
    """Which neighbours a ``k x k`` conv may read in cluster-causal mode.

    ids: (B, Gh, Gw) prediction-unit id (or scan rank) of every grid cell. Returns (B, k*k, Gh, Gw) bool: the
    neighbour at offset ``o`` is valid iff its id is <= the centre's (same or earlier unit). Out-of-image
    neighbours are marked invalid (they are zero padding anyway).
    """
    B, H, W = ids.shape
    r = k // 2
    padded = F.pad(ids, (r, r, r, r), value=int(ids.max()) + 1)
    return torch.stack([padded[:, dy : dy + H, dx : dx + W] <= ids for dy in range(k) for dx in range(k)], dim=1)


class MatrixLSTMCell(nn.Module):
    """Gates + mLSTM kernel + per-head norm.

    ``q, k, v: (B, L, I)`` already in scan order -> ``h: (B, L, NH, DH)`` (not yet normed). The gates read the
    concatenation ``[q, k, v]`` (weights ``(NH, 3I)``, as in the official ViL).
    """

    def __init__(self, inner: int, num_heads: int, *, norm_bias: bool = True) -> None:
        super().__init__()
        if inner % num_heads:
            raise ValueError(f"inner width {inner} is not divisible by the number of heads {num_heads}")
        self.inner = inner
        self.num_heads = num_heads
        self.igate = nn.Linear(3 * inner, num_heads)
        self.fgate = nn.Linear(3 * inner, num_heads)
        self.outnorm = MultiHeadNorm(inner, num_heads, bias=norm_bias)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, std=0.1)
        nn.init.zeros_(self.outnorm.weight)
        if self.outnorm.bias is not None:
            nn.init.zeros_(self.outnorm.bias)

    def gates(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, by_parts: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and forget gate pre-activations ``(B, NH, L)`` of ``q, k, v: (B, L, I)``.

        ``by_parts`` (default: on CPU without autocast) sums three partial products instead of one product on the
        concatenation, whose ``(B, L, 3I)`` copy cost 9% of the ViL-T forward on CPU. Elsewhere the concatenation
        is kept: under bf16 autocast each partial product would be rounded to bf16 before the sum. By parts, inputs
        in channels-first memory (``q.mT`` contiguous, as :class:`ViLLayer` makes them) are multiplied as
        ``(B, I, L)``, which needs no copy and gives the gates in the kernel's ``(B, NH, L)`` layout.
        """
        NH = self.num_heads
        w = torch.cat([self.igate.weight, self.fgate.weight])  # (2 NH, 3I), small
        b = torch.cat([self.igate.bias, self.fgate.bias])
        if by_parts is None:
            by_parts = q.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
        if by_parts and all(t.mT.is_contiguous() for t in (q, k, v)):
            wq, wk, wv = w.split(self.inner, dim=1)
            g = (wq @ q.mT).add_(wk @ k.mT).add_(wv @ v.mT).add_(b[:, None])  # (B, 2 NH, L)
            ig, fg = g.split(NH, dim=1)
            return ig, fg
        if by_parts:
            wq, wk, wv = w.split(self.inner, dim=1)
            g = F.linear(q, wq, b) + F.linear(k, wk) + F.linear(v, wv)
        else:
            g = F.linear(torch.cat([q, k, v], dim=-1), w, b)
        ig, fg = g.transpose(1, 2).split(NH, dim=1)  # (B, NH, L) each
        return ig, fg

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        segment_ids: torch.Tensor | None,
        backend: str,
        chunk_size: int,
        reverse: bool = False,
    ) -> torch.Tensor:
        B, L, _ = q.shape
        NH = self.num_heads
        ig, fg = self.gates(q, k, v)
        q, k, v = (t.reshape(B, L, NH, -1).transpose(1, 2) for t in (q, k, v))  # (B, NH, L, DH)
        h = mlstm(q, k, v, ig, fg, segment_ids=segment_ids, backend=backend, chunk_size=chunk_size, reverse=reverse)
        return h.transpose(1, 2)  # (B, L, NH, DH)


class ViLLayer(nn.Module):
    """The mLSTM layer of a ViL block. ``x: (B, L, D)`` in canonical order -> ``(B, L, D)``."""

    def __init__(self, cfg: ViLConfig) -> None:
        super().__init__()
        D, inner = cfg.dim, cfg.inner
        self.cfg = cfg
        self.proj_up = nn.Linear(D, 2 * inner, bias=cfg.proj_bias)
        self.conv = nn.Conv2d(
            inner, inner, cfg.conv_kernel_size, padding=cfg.conv_kernel_size // 2, groups=inner, bias=True
        )
        self.q_proj = BlockDiagonalLinear(inner, cfg.qkv_block_size, bias=cfg.proj_bias)
        self.k_proj = BlockDiagonalLinear(inner, cfg.qkv_block_size, bias=cfg.proj_bias)
        self.v_proj = BlockDiagonalLinear(inner, cfg.qkv_block_size, bias=cfg.proj_bias)
        self.mlstm_cell = MatrixLSTMCell(inner, cfg.num_heads, norm_bias=cfg.norm_bias)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, D, bias=cfg.proj_bias)

    def reset_parameters(self) -> None:
        D = self.cfg.dim
        small_init_(self.proj_up.weight, D)
        wang_init_(self.proj_down.weight, D)
        for lin in (self.proj_up, self.proj_down):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            small_init_(proj.weight, D)  # the official code uses D here, not the inner width
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        self.conv.reset_parameters()
        nn.init.ones_(self.learnable_skip)
        self.mlstm_cell.reset_parameters()

    def _conv(self, x: torch.Tensor, seq: SequencePlan, plan: BlockPlan) -> torch.Tensor:
        """Depthwise conv in image space. ``x: (B, L, I)`` canonical order -> ``(B, L, I)``."""
        B, n, C = x.shape
        Gh, Gw = seq.grid
        L = Gh * Gw
        if seq.keep is not None:  # the dropped positions are zeros; the conv mask never reads them anyway
            if seq.order is None:
                raster = F.pad(x, (0, 0, 0, L - n))
            else:
                order = seq.order[..., :n]
                if order.dim() == 1:
                    raster = x.new_zeros(B, L, C).index_copy(1, order, x)
                else:
                    raster = x.new_zeros(B, L, C).scatter(1, order[..., None].expand(-1, -1, C), x)
        else:
            raster = x if seq.order is None else unserialize(x, seq.order)
        img = raster.transpose(1, 2).reshape(B, C, Gh, Gw)
        w = self.conv.weight.flip(-1, -2) if plan.flip_kernel else self.conv.weight
        out = depthwise_conv(img, w, self.conv.bias, plan.conv_valid).reshape(B, C, L).transpose(1, 2)
        if seq.keep is not None:
            if seq.order is None:
                return out[:, :n]
            return out.index_select(1, order) if order.dim() == 1 else out.gather(1, order[..., None].expand(-1, -1, C))
        return out if seq.order is None else serialize(out, seq.order)

    def _up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``proj_up``: ``x: (B, L, D)`` -> ``x_m, z: (B, L, I)``.

        On CPU in eager mode ``x_m`` comes in channels-first ``(B, I, L)`` memory, like the conv's output ``c``,
        computed as such (``W_m x^T``, one batched matmul): the conv reads it as an image without a copy, and the
        q/k/v projections and gates multiply with the tokens innermost, their fastest form on CPU
        (:meth:`BlockDiagonalLinear.method`, :meth:`MatrixLSTMCell.gates`). Elsewhere one product, split.
        """
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return self.proj_up(x).chunk(2, dim=-1)
        inner, b = self.cfg.inner, self.proj_up.bias
        w_m, w_z = self.proj_up.weight.split(inner)
        w_m = w_m.expand(x.shape[0], *w_m.shape)  # (B, I, D), a view
        x_m = torch.bmm(w_m, x.mT) if b is None else torch.baddbmm(b[:inner, None], w_m, x.mT)  # (B, I, L)
        return x_m.mT, F.linear(x, w_z, None if b is None else b[inner:])

    def forward(self, x: torch.Tensor, seq: SequencePlan, plan: BlockPlan) -> torch.Tensor:
        x_m, z = self._up(x)  # (B, L, I) each
        c = F.silu(self._conv(x_m, seq, plan))
        q, k, v = self.q_proj(c), self.k_proj(c), self.v_proj(x_m)  # (B, L, I) each, canonical order
        cell = dict(backend=self.cfg.backend, chunk_size=self.cfg.chunk_size)
        if plan.reversal and plan.segment_ids is None:  # the kernel scans backward in place: no reordering
            h = self.mlstm_cell(q, k, v, segment_ids=None, reverse=True, **cell)  # (B, L, NH, DH) canonical
        else:
            q, k, v = (plan.to_scan(t) for t in (q, k, v))
            h = plan.from_scan(self.mlstm_cell(q, k, v, segment_ids=plan.segment_ids, **cell))
        h = self.mlstm_cell.outnorm(h)  # (B, L, I)
        h = torch.addcmul(h, self.learnable_skip, c)  # one pass instead of two
        return self.proj_down(h * F.silu(z))


class ViLBlock(nn.Module):
    """Pre-norm residual block: ``x + DropPath(ViLLayer(norm(x)))``. ``x: (B, L, D) -> (B, L, D)``."""

    def __init__(self, cfg: ViLConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm = OffsetLayerNorm(cfg.dim, bias=cfg.norm_bias)
        self.layer = ViLLayer(cfg)
        self.drop_path = DropPath(drop_path)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.norm.weight)
        if self.norm.bias is not None:
            nn.init.zeros_(self.norm.bias)
        self.layer.reset_parameters()

    def forward(self, x: torch.Tensor, seq: SequencePlan, plan: BlockPlan) -> torch.Tensor:
        return x + self.drop_path(self.layer(self.norm(x), seq, plan))


class ViLBlockPair(nn.Module):
    """Two blocks; in fine-tuning ``fwd`` scans forward and ``bwd`` backward. One 'layer' for layer decay."""

    def __init__(self, cfg: ViLConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.fwd = ViLBlock(cfg, drop_path)
        self.bwd = ViLBlock(cfg, drop_path)

    def forward(self, x: torch.Tensor, seq: SequencePlan, plans: tuple[BlockPlan, BlockPlan]) -> torch.Tensor:
        return self.bwd(self.fwd(x, seq, plans[0]), seq, plans[1])


class ViLEncoder(LayoutOwner, LayoutRecorded, nn.Module):
    """Patch embedding + 2-D position embedding + ``depth`` block pairs + final norm.

    ``forward(x: (B, C, H, W), mode) -> (B, L, D)`` token features after the final norm, in the canonical
    serialized order (``self.layout.order`` maps positions to raster indices; raster order for the default layout).
    The patch grid is derived from the input; the position embedding is resized when it differs.
    """

    def __init__(self, cfg: ViLConfig) -> None:
        super().__init__()
        retain_freed_memory()  # CPU speed as a library user meets it; process-wide, see mal.runtime
        self.cfg = cfg = cfg.resolved()
        self.pretrained_cfg = default_pretrained_cfg(cfg)
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.dim, cfg.patch_size)
        self.pos_embed = PosEmbed2d(cfg.grid, cfg.dim)
        if cfg.drop_path_decay:
            dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        else:
            dpr = [cfg.drop_path_rate] * cfg.depth
        self.blocks = nn.ModuleList(ViLBlockPair(cfg, p) for p in dpr)
        self.norm = OffsetLayerNorm(cfg.dim, bias=cfg.norm_bias, eps=1e-6)
        self.schedule = cfg.layout.schedule(cfg.depth)
        self._plan_cache: dict[tuple, SequencePlan] = {}
        self._record_layout()
        self.reset_parameters()
        # built eagerly now, so that torch.export / ONNX export at this resolution on CPU traces no planning
        with torch.device("cpu"):
            self.plan(cfg.grid, "finetune", torch.device("cpu"))

    def reset_parameters(self) -> None:
        self.patch_embed.reset_parameters()
        self.pos_embed.reset_parameters()
        for pair in self.blocks:
            pair.fwd.reset_parameters()
            pair.bwd.reset_parameters()
        nn.init.zeros_(self.norm.weight)
        if self.norm.bias is not None:
            nn.init.zeros_(self.norm.bias)

    @property
    def num_layers(self) -> int:
        """Block pairs (the unit of layer-wise lr decay)."""
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed.embed"}

    @torch.compiler.disable  # host-side bookkeeping (layouts, caches): keep it out of compiled graphs
    def plan(
        self,
        grid: tuple[int, int],
        mode: str,
        device: torch.device,
        scan: Scan | None = None,
        batch_size: int | None = None,
        drop_last_unit: bool = False,
    ) -> SequencePlan:
        """The scan plan of every block for a patch grid and mode.

        Fixed layouts are cached. A ``random`` cluster order in pretrain mode uses ``scan`` or, given ``batch_size``,
        draws one (torch's global RNG); in fine-tuning it falls back to ``row`` (docs/DESIGN.md, 'Fine-tuning').
        ``drop_last_unit`` (pretrain mode): skip the last unit of the scan where every block's scan ends with it
        and it has the same size in every sample (else nothing is dropped; ``plan.keep`` says what was done).
        """
        if mode not in MODES:
            raise ValueError(f"unknown encoder mode {mode!r}; valid modes: {', '.join(MODES)}")
        layout = self.layout_for(grid)
        if scan is None and mode == "pretrain" and layout.cluster_order == "random":
            if batch_size is None:
                raise ValueError("a random cluster order needs a per-sample scan: pass scan=encoder.draw_scan(B)")
            scan = layout.draw(batch_size)
        drop = drop_last_unit and mode == "pretrain"
        if scan is not None:
            if (scan.grid_h, scan.grid_w) != tuple(grid):
                raise ValueError(f"scan is for a {scan.grid_h}x{scan.grid_w} grid, the input has {grid[0]}x{grid[1]}")
            return self._build_plan(scan.to(device), mode, per_sample=True, drop_last_unit=drop)
        key = (grid, mode, str(device), drop)
        if key not in self._plan_cache:
            if torch._guards.detect_fake_mode() is not None:  # tracing (torch.export): plans are data, not graph
                raise ValueError(
                    f"no scan plan for a {grid[0]}x{grid[1]} grid in {mode} mode on {device} while tracing: export "
                    "on CPU at the model's image_size, or run the model once on that input eagerly first"
                )
            if layout.cluster_order == "random":  # finetune mode: random -> row
                layout = layout.with_grid(*grid)
            scan = layout.draw(1, device=device)
            self._plan_cache[key] = self._build_plan(scan, mode, per_sample=False, drop_last_unit=drop)
        return self._plan_cache[key]

    def _build_plan(self, scan: Scan, mode: str, *, per_sample: bool, drop_last_unit: bool = False) -> SequencePlan:
        """Block plans from a canonical scan ``(B or 1, L)``; shared tensors are kept as ``(L,)``."""
        cfg, k = self.cfg, self.cfg.conv_kernel_size
        L = scan.num_tokens
        ident = torch.arange(L, device=scan.order.device)

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t if per_sample else t[0]

        def perm_or_none(p: torch.Tensor) -> torch.Tensor | None:
            return None if not per_sample and torch.equal(p, ident) else p

        order = rows(scan.order)
        blocks: list[BlockPlan] = []
        for within in self.schedule:
            scan_j, perm = scan.within_with_perm(within)
            perm = rows(perm)
            if mode == "finetune":
                seg = rows(scan_j.cluster_ids) if cfg.layout.finetune_cell == "cluster" else None
                rev = perm.flip(-1)
                rev_seg = None if seg is None else (seg.max() - seg).flip(-1)
                blocks.append(BlockPlan(perm_or_none(perm), seg))
                reversal = not per_sample and torch.equal(rev, ident.flip(-1))
                blocks.append(BlockPlan(rev, rev_seg, flip_kernel=True, reversal=reversal))
            else:
                if cfg.layout.within_cluster == "full":
                    seg, ids = rows(scan_j.unit_ids), scan.grid_unit_ids()
                else:  # token-level causal (MAL-v1 literal reading): rank in this block's scan order
                    seg, ids = None, scan_j.inverse.view(-1, scan.grid_h, scan.grid_w)
                valid = conv_validity(ids, k)
                p = perm_or_none(perm)
                blocks.append(BlockPlan(p, seg, flip_kernel=False, conv_valid=valid))
                blocks.append(BlockPlan(p, seg, flip_kernel=True, conv_valid=valid))
        seq = SequencePlan(grid=(scan.grid_h, scan.grid_w), order=perm_or_none(order), blocks=blocks)
        return _drop_last_unit(seq, scan) if drop_last_unit else seq

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch + position embedding, flattened in raster order. ``(B, C, H, W) -> (B, L, D)``."""
        t = self.pos_embed(self.patch_embed(x))  # (B, Gh, Gw, D); patch_embed validates the input
        return t.flatten(1, 2), (t.shape[1], t.shape[2])

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: list[int] | None = None,
        *,
        mode: str = "finetune",
        scan: Scan | None = None,
        drop_last_unit: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final features and the outputs of the block pairs in ``indices`` (0-based, before the final norm).

        Returns ``(B, L, D)`` and a list of ``(B, L, D)``, all in canonical serialized order (``scan.order``, or
        ``self.layout_for(grid).order`` for fixed layouts, gives the raster index of each position).
        ``drop_last_unit=True`` (pretrain mode) may skip the last unit, whose outputs no pretraining target
        needs: then ``L`` is the number of tokens before it (see :meth:`plan`); the other outputs are unchanged.
        """
        t, grid = self.embed(x)
        seq = self.plan(grid, mode, x.device, scan, batch_size=x.shape[0], drop_last_unit=drop_last_unit)
        t = t if seq.order is None else serialize(t, seq.order)
        if seq.keep is not None:  # contiguous: every block pair sees the same strides (compiled blocks: no recompiles)
            t = t[:, : seq.keep].contiguous()
        feats = []
        for i, pair in enumerate(self.blocks):
            t = self.run_block(pair, t, seq, (seq.blocks[2 * i], seq.blocks[2 * i + 1]))
            if indices is not None and i in indices:
                feats.append(t)
        return self.norm(t), feats

    def forward_visible(self, x: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MAE encoder pass (docs/DESIGN.md, 'Baselines') on the visible patches only, ``visible: (B, Lv)``
        raster indices.

        The visible tokens form a shorter sequence in the canonical scan order; each block pair scans them in its
        own order, forward then backward, like ``finetune`` mode; the conv sees them scattered onto a zero grid.
        Returns the features ``(B, Lv, D)`` and the raster index ``(B, Lv)`` of each output token.
        """
        t, grid = self.embed(x)
        layout = self.layout_for(grid)  # its fixed order (a random cluster order reads as row, as in fine-tuning)
        visible = canonical_visible(layout.order.to(x.device), visible)
        blocks = []
        for within in self.schedule:
            rank = layout.with_within_order(within).inverse.to(x.device)  # (L,) position in this pair's scan
            perm = rank[visible].argsort(dim=1)  # canonical visible positions in this pair's order
            blocks += [BlockPlan(perm), BlockPlan(perm.flip(-1), flip_kernel=True)]
        seq = SequencePlan(grid=grid, order=visible, blocks=blocks, keep=visible.shape[1])
        t = t.gather(1, visible[..., None].expand(-1, -1, t.shape[-1]))
        for i, pair in enumerate(self.blocks):
            t = self.run_block(pair, t, seq, (seq.blocks[2 * i], seq.blocks[2 * i + 1]))
        return self.norm(t), visible

    def forward(self, x: torch.Tensor, mode: str = "finetune", scan: Scan | None = None) -> torch.Tensor:
        """``(B, C, H, W) -> (B, L, D)``; ``mode="pretrain"`` is cluster-causal (docs/DESIGN.md, 'Encoder modes')."""
        return self.forward_intermediates(x, None, mode=mode, scan=scan)[0]


def _drop_last_unit(seq: SequencePlan, scan: Scan) -> SequencePlan:
    """``seq`` restricted to the canonical positions before the last unit, when that is exact (see ``plan``)."""
    keep = keep_before_last_unit(scan.unit_ids)  # (B, L), canonical order: non-decreasing
    if keep is None:
        return seq
    blocks = []
    for b in seq.blocks:
        perm = b.perm
        if perm is not None:
            perm = perm[..., :keep]
            if bool((perm >= keep).any()):  # this block's scan does not end with the same unit
                return seq
        seg = None if b.segment_ids is None else b.segment_ids[..., :keep]
        blocks.append(BlockPlan(perm, seg, flip_kernel=b.flip_kernel, conv_valid=b.conv_valid))
    return SequencePlan(grid=seq.grid, order=seq.order, blocks=blocks, keep=keep)


class ViLClassifier(EncoderClassifier):
    """ViL encoder + bilateral pooling (concat of the first and last token) + linear head.

    ``forward(x: (B, C, H, W)) -> (B, num_classes)``.
    """

    def __init__(self, cfg: ViLConfig) -> None:
        super().__init__()
        self.encoder = ViLEncoder(cfg)
        self.cfg = cfg = self.encoder.cfg
        self.legacy_norm = nn.LayerNorm(2 * cfg.dim) if cfg.legacy_norm else nn.Identity()
        self.head = self.make_head(self.head_hidden_size, cfg.num_classes)

    @property
    def head_hidden_size(self) -> int:
        return 2 * self.cfg.dim

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L, D) -> (B, 2D)``: the tokens where the last forward and backward scans end."""
        return self.legacy_norm(torch.cat([tokens[:, 0], tokens[:, -1]], dim=-1))
