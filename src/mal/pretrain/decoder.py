"""The autoregressive pixel decoder (docs/DESIGN.md, 'Pretraining decoder and objective': a deviation from MAL-v2).

Content-free queries (ARM) with block-causal self-attention among them (this design) and cross-attention to
the encoder memory of strictly earlier prediction units. One query per target patch: ``q_p = a + e_p`` with a
learned token ``a`` and the fixed 2-D sin-cos position ``e_p``; memory ``m_s = Linear(h_s) + e_s``.

All masks come from unit ids (never from slot positions), so ragged clusters and per-sample (random) orders
need no special case. Shapes: ``B`` batch, ``Lq`` queries, ``Lm`` memory tokens, ``E`` decoder width,
``D`` encoder width, ``P = p * p * C`` pixels per patch.
"""

from __future__ import annotations

import torch
from torch import nn

from mal.models.layers import Attention, init_transformer_


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``(Gh * Gw, dim)`` in raster order (MAE convention).

    The first half of the channels encodes the row, the second half the column; each half is
    ``[sin(pos * w_i), cos(pos * w_i)]`` with ``w_i = 10000 ** (-i / (dim / 4))``.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.to(torch.float64)[:, None] * omega[None]  # (N, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, dim/2)

    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.cat([embed(rows), embed(cols)], dim=1).float()


_SINCOS_TABLES: dict[tuple[int, int, int, str], torch.Tensor] = {}


def sincos_table(dim: int, grid_h: int, grid_w: int, device: str) -> torch.Tensor:
    """:func:`sincos_pos_embed_2d` on ``device``, computed once per (width, grid, device) for every decoder (a plain
    dict, which torch.compile traces without a warning, unlike ``functools.lru_cache``)."""
    key = (dim, grid_h, grid_w, device)
    if key not in _SINCOS_TABLES:
        with torch.inference_mode(False):  # a normal tensor even when first asked for under inference mode
            _SINCOS_TABLES[key] = sincos_pos_embed_2d(dim, grid_h, grid_w).to(device)
    return _SINCOS_TABLES[key]


def decoder_masks(query_units: torch.Tensor, memory_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean attention masks (True = may attend) of the decoder.

    query_units: (B, Lq) unit id of each query's target; memory_units: (B, Lm) unit id of each memory token.
    Returns ``self_mask (B, Lq, Lq)``: a query of unit ``k`` sees queries of units ``<= k``; and
    ``cross_mask (B, Lq, Lm)``: a query of unit ``k`` sees memory of units ``< k``. Queries of unit 0 (never
    predicted; only present when a batch has ragged first units) may read unit 0 so that no row is empty:
    their outputs only reach queries of later units, for which unit 0 is past.
    """
    qu = query_units[:, :, None]
    self_mask = query_units[:, None, :] <= qu
    cross_mask = memory_units[:, None, :] < qu.clamp(min=1)
    return self_mask, cross_mask


class DecoderBlock(nn.Module):
    """Pre-norm block: masked self-attention among queries, masked cross-attention to memory, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.norm_mem = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, self_mask: torch.Tensor, cross_mask: torch.Tensor
    ) -> torch.Tensor:
        """x: (B, Lq, E); memory: (B, Lm, E); masks as :func:`decoder_masks`. Returns (B, Lq, E)."""
        h = self.norm1(x)
        x = x + self.self_attn(h, h, self_mask)
        x = x + self.cross_attn(self.norm2(x), self.norm_mem(memory), cross_mask)
        return x + self.mlp(self.norm3(x))


def tap_pairs(depth: int) -> list[int]:
    """0-based encoder pair indices of the four memory taps: ARM's 1/2, 2/3, 5/6 and 1 of the depth."""
    return [max(1, round(f * depth)) - 1 for f in (1 / 2, 2 / 3, 5 / 6, 1.0)]


def tap_schedule(encoder_depth: int, decoder_depth: int) -> tuple[list[int], list[int]]:
    """Which taps a decoder uses: block ``b`` of ``n`` reads tap ``floor(4 b / n)`` (ARM).

    Returns ``(pairs, memory_index)``: the encoder pair of each *used* tap (a shallow decoder skips some, so
    no parameter goes unused) and, per decoder block, the index into ``pairs``.
    """
    taps = tap_pairs(encoder_depth)
    wanted = [4 * b // decoder_depth for b in range(decoder_depth)]
    used = sorted(set(wanted))
    return [taps[i] for i in used], [used.index(w) for w in wanted]


class ARDecoder(nn.Module):
    """Predicts the pixels of every target patch from the memory of earlier units.

    ``forward(memory, memory_units, memory_pos, query_units, query_pos) -> (B, Lq, P)``.
    ``memory`` is a list of ``(B, Lm, D)`` encoder outputs: one (``memory="last"``) or one per tap; decoder block
    ``b`` reads ``memory[memory_index[b]]`` (default: all read ``memory[0]``). Positions are raster indices.
    """

    def __init__(
        self,
        encoder_dim: int,
        patch_dim: int,
        *,
        dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_memories: int = 1,
        memory_index: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.memory_index = list(memory_index) if memory_index is not None else [0] * depth
        if len(self.memory_index) != depth or not set(self.memory_index) <= set(range(num_memories)):
            raise ValueError(f"memory_index {self.memory_index} must give one of {num_memories} memories per block")
        self.dim, self.depth = dim, depth
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.memory_embed = nn.ModuleList(nn.Linear(encoder_dim, dim) for _ in range(num_memories))
        self.blocks = nn.ModuleList(DecoderBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.query_token, std=0.02)
        init_transformer_(self)

    def no_weight_decay(self) -> set[str]:
        return {"query_token"}

    def pos_embed(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """``(Gh * Gw, E)`` fixed sin-cos table for a patch grid (cached per grid and device)."""
        return sincos_table(self.dim, *grid, str(device))

    def forward(
        self,
        memory: list[torch.Tensor],
        memory_units: torch.Tensor,
        memory_pos: torch.Tensor,
        query_units: torch.Tensor,
        query_pos: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """memory: list of (B, Lm, D); memory_units/memory_pos: (B, Lm); query_units/query_pos: (B, Lq);
        grid: the patch grid the raster positions refer to. Returns (B, Lq, P)."""
        if len(memory) != len(self.memory_embed):
            raise ValueError(f"decoder expects {len(self.memory_embed)} memory tensor(s), got {len(memory)}")
        table = self.pos_embed(grid, memory[0].device).to(memory[0].dtype)
        mem = [embed(h) + table[memory_pos] for embed, h in zip(self.memory_embed, memory, strict=True)]
        x = self.query_token + table[query_pos]  # (B, Lq, E)
        self_mask, cross_mask = decoder_masks(query_units, memory_units)
        for block, i in zip(self.blocks, self.memory_index, strict=True):
            x = block(x, mem[i], self_mask, cross_mask)
        return self.head(self.norm(x))
