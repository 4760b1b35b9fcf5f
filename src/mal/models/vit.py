"""ViT encoder with the same patch/position embedding and scan layouts as the ViL encoder (the MAL-v2 Table 4
baseline): a pre-norm Transformer on :func:`torch.nn.functional.scaled_dot_product_attention`.

Modes, as for ViL (docs/DESIGN.md, 'Encoder modes'):

* ``finetune``: full (bidirectional) attention;
* ``pretrain``: **cluster-causal** attention, the block-causal mask of the prediction units: a token of unit ``u``
  attends to the tokens of units ``<= u`` (``within_cluster="full"``) or, with ``within_cluster="causal"``, to
  itself and the tokens before it in the canonical scan order.

Tokens are kept in the layout's canonical serialized order, so every consumer of the ViL encoder's outputs
(pretraining decoder, dense heads, bilateral pooling) works unchanged. ``forward_visible`` is the MAE pass.

Shapes: ``B`` batch, ``L = Gh * Gw`` tokens, ``D`` width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mal.models.base import EncoderClassifier, EncoderConfig, LayoutRecorded, default_pretrained_cfg
from mal.models.layers import Attention, DropPath, PatchEmbed, PosEmbed2d, init_transformer_
from mal.runtime import retain_freed_memory
from mal.tokens import LayoutOwner, Scan, canonical_visible, keep_before_last_unit, serialize

MODES = ("finetune", "pretrain")
POOLS = ("mean", "bilateral")


@dataclass
class ViTConfig(EncoderConfig):
    """Everything that defines a ViT encoder (and its classification head): the shared fields of
    :class:`~mal.models.base.EncoderConfig` (``depth`` counts Transformer blocks; one block has about the parameters
    of one ViL block pair, so equal depths give models of equal size) and the Transformer's own. Of the layout's
    scan schedule only the last order matters (the canonical order): attention itself has no order."""

    family: ClassVar[str] = "vit"

    num_heads: int = 3
    mlp_ratio: float = 4.0
    pool: str = "mean"  # classifier input: mean of the tokens, or "bilateral" (first and last token, as ViL)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(num_heads=self.num_heads >= 1 and self.dim % self.num_heads == 0, mlp_ratio=self.mlp_ratio > 0)


class ViTBlock(nn.Module):
    """Pre-norm Transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``. ``(B, L, D) -> (B, L, D)``;
    ``mask``: ``(B or 1, L, L)`` bool (True = may attend) or None."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop_path(self.attn(h, h, mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTEncoder(LayoutOwner, LayoutRecorded, nn.Module):
    """Patch embedding + 2-D position embedding + ``depth`` Transformer blocks + final LayerNorm.

    ``forward(x: (B, C, H, W), mode) -> (B, L, D)`` in the canonical serialized order of the layout, like
    :class:`~mal.models.vil.ViLEncoder` (same ``forward_intermediates`` / ``forward_visible`` interface).
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.layout.finetune_cell != "causal":
            raise ValueError("finetune_cell applies to ViL's mLSTM cell; a ViT attends to every token in fine-tuning")
        retain_freed_memory()  # CPU speed as a library user meets it; process-wide, see mal.runtime
        self.cfg = cfg = cfg.resolved()
        self.pretrained_cfg = default_pretrained_cfg(cfg)
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.dim, cfg.patch_size)
        self.pos_embed = PosEmbed2d(cfg.grid, cfg.dim)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist() if cfg.drop_path_decay else None
        self.blocks = nn.ModuleList(
            ViTBlock(cfg.dim, cfg.num_heads, cfg.mlp_ratio, dpr[i] if dpr else cfg.drop_path_rate)
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.schedule = cfg.layout.schedule(cfg.depth)
        self._record_layout()
        self.reset_parameters()
        _ = self.layout  # built eagerly now (index tensors), so that export at this resolution traces no planning

    def reset_parameters(self) -> None:
        init_transformer_(self)
        self.patch_embed.reset_parameters()
        self.pos_embed.reset_parameters()

    @property
    def num_layers(self) -> int:
        """Transformer blocks (the unit of layer-wise lr decay)."""
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed.embed"}

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch + position embedding, flattened in raster order. ``(B, C, H, W) -> (B, L, D)``."""
        t = self.pos_embed(self.patch_embed(x))
        return t.flatten(1, 2), (t.shape[1], t.shape[2])

    def attention_plan(
        self, grid: tuple[int, int], mode: str, scan: Scan | None, batch_size: int, drop_last_unit: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """``(order, mask, keep)``: raster index of each canonical position ``(L,)`` or ``(B, L)``; the attention
        mask ``(1 or B, L', L')`` (None in ``finetune`` mode); and the number of positions computed (``None``:
        all; pretraining may skip the last unit, which no earlier token attends to)."""
        if mode not in MODES:
            raise ValueError(f"unknown encoder mode {mode!r}; valid modes: {', '.join(MODES)}")
        layout = self.layout_for(grid)
        if mode == "finetune":
            return layout.order, None, None
        if scan is None:
            scan = layout.draw(batch_size)  # random orders draw from torch's global RNG
        elif (scan.grid_h, scan.grid_w) != tuple(grid):
            raise ValueError(f"scan is for a {scan.grid_h}x{scan.grid_w} grid, the input has {grid[0]}x{grid[1]}")
        units = scan.unit_ids  # (B, L), non-decreasing
        fixed = layout.cluster_order != "random"
        if fixed:
            units = units[:1]
        keep = keep_before_last_unit(units) if drop_last_unit else None
        if keep is not None:
            units = units[:, :keep]
        if self.cfg.layout.within_cluster == "full":
            mask = units[:, None, :] <= units[:, :, None]
        else:
            n = units.shape[1]
            mask = torch.ones(n, n, dtype=torch.bool, device=units.device).tril()[None]
        return (scan.order[0] if fixed else scan.order), mask, keep

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: list[int] | None = None,
        *,
        mode: str = "finetune",
        scan: Scan | None = None,
        drop_last_unit: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final features ``(B, L, D)`` and the outputs of the blocks in ``indices`` (before the final norm), all
        in canonical order; as :meth:`mal.models.vil.ViLEncoder.forward_intermediates`."""
        t, grid = self.embed(x)
        order, mask, keep = self.attention_plan(grid, mode, scan, x.shape[0], drop_last_unit)
        t = serialize(t, order.to(x.device))
        if keep is not None:
            t = t[:, :keep]
        return self.run_blocks(t, indices, None if mask is None else mask.to(x.device))

    def forward_visible(self, x: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MAE encoder pass on the visible patches only. ``visible: (B, Lv)`` raster indices. Returns the
        features ``(B, Lv, D)`` and the raster index ``(B, Lv)`` of each output token (``visible`` in canonical
        scan order)."""
        t, grid = self.embed(x)
        visible = canonical_visible(self.layout_for(grid).order.to(x.device), visible)
        t = t.gather(1, visible[..., None].expand(-1, -1, t.shape[-1]))
        return self.run_blocks(t, None)[0], visible

    def forward(self, x: torch.Tensor, mode: str = "finetune", scan: Scan | None = None) -> torch.Tensor:
        """``(B, C, H, W) -> (B, L, D)``; ``mode="pretrain"`` is cluster-causal."""
        return self.forward_intermediates(x, None, mode=mode, scan=scan)[0]


class ViTClassifier(EncoderClassifier):
    """ViT encoder + pooling (mean of the tokens, or ViL's first + last) + linear head.
    ``forward(x: (B, C, H, W)) -> (B, num_classes)``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.pool not in POOLS:
            raise ValueError(f"unknown pool {cfg.pool!r}; valid: {', '.join(POOLS)}")
        self.encoder = ViTEncoder(cfg)
        self.cfg = cfg = self.encoder.cfg
        self.head = self.make_head(self.head_hidden_size, cfg.num_classes)

    @property
    def head_hidden_size(self) -> int:
        return self.cfg.dim if self.cfg.pool == "mean" else 2 * self.cfg.dim

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L, D) -> (B, head_hidden_size)``."""
        return tokens.mean(dim=1) if self.cfg.pool == "mean" else torch.cat([tokens[:, 0], tokens[:, -1]], -1)
