"""The decoders of MAL-v2 Table 13: the autoregressive pixel decoder with attention (the default,
:class:`~mal.pretrain.decoder.ARDecoder`), with mLSTM blocks (the "symmetric" xLSTM decoder) or with Mamba blocks.

The recurrent decoders do the Transformer decoder's job with the same inputs and outputs: one query per target
patch, ``q_p = a + e_p``, and the encoder memory, ``m_s = Linear(h_s) + e_s``, predict the pixels of every
patch of units ``1 .. K-1``. A recurrence has no cross-attention, so memory and queries share one sequence per
sample, ordered by unit (:func:`interleave`)::

    memory of unit 0 | queries of unit 1 | memory of unit 1 | queries of unit 2 | ... | queries of unit K-1

Everything in front of the queries of unit ``k`` is memory of units ``< k`` (which the cluster-causal encoder
computed from the pixels of units ``< k`` only) and content-free queries, so a decoder that is causal along this
sequence cannot see a pixel of unit ``k`` or later when it predicts unit ``k``:

* mLSTM (:class:`MLSTMDecoder`): the segment-causal mLSTM of the encoder's ``pretrain`` mode with segment ids
  ``2 j`` (memory of unit ``j``) and ``2 k - 1`` (queries of unit ``k``): a token sees its own segment and every
  earlier one, so the queries of a unit see each other, as in the Transformer decoder's block-causal
  self-attention. Its conv is the causal 1-D conv of the original xLSTM block, which reads earlier tokens only.
* Mamba (:class:`MambaDecoder`): Mamba's plain causal scan (S6) and causal conv along the sequence; a query sees
  all the memory it may, and the queries of its own unit that come before it.

``decoder_depth`` counts block *pairs* for both, as the ViL encoder counts its depth: two mLSTM or two Mamba
blocks (about ``2 x 6 E^2`` parameters) stand for one Transformer decoder block (self-attention, cross-attention
and MLP, ``16 E^2``). Shapes: ``B`` batch, ``Lm`` memory tokens, ``Lq`` queries, ``S = Lm + Lq``, ``E`` decoder
width, ``D`` encoder width, ``P = p * p * C`` pixels per patch, ``I = 2 E`` inner width, ``N`` Mamba state size.
"""

from __future__ import annotations

import torch
from torch import nn

from mal.models.layers import OffsetLayerNorm, init_transformer_
from mal.models.mamba import MambaMixer, causal_depthwise_conv
from mal.models.vil import BlockPlan, ViLConfig, ViLLayer
from mal.models.vit import ViTBlock
from mal.pretrain.decoder import ARDecoder, sincos_table

#: The values of ``objective.decoder``.
DECODER_KINDS = ("transformer", "mlstm", "mamba", "paper")


def interleave(
    memory: torch.Tensor, memory_units: torch.Tensor, queries: torch.Tensor, query_units: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence per sample with the memory of unit ``j`` right before the queries of unit ``j + 1``.

    memory: (B, Lm, E), memory_units: (B, Lm); queries: (B, Lq, E), query_units: (B, Lq); both in the scan's
    canonical order. Each token gets the key ``2 j`` (memory of unit ``j``) or ``2 k - 1`` (query of unit ``k``);
    a stable sort by key keeps the scan order within each group. Returns the sequence ``(B, S, E)``, its keys
    ``(B, S)`` (non-decreasing: the segment ids of the mLSTM decoder; a query sees exactly the memory of earlier
    units in front of it) and ``query_index (B, Lq)``, the sequence position of each query. Queries of unit 0
    (never predicted; ragged random batches only) get key -1 and come first, with nothing but themselves to see.
    """
    keys = torch.cat([2 * memory_units, 2 * query_units - 1], dim=1)  # (B, S)
    order = keys.argsort(dim=1, stable=True)  # (B, S): input index of each sequence position
    tokens = torch.cat([memory, queries], dim=1)
    x = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))
    position = order.argsort(dim=1)  # inverse permutation: sequence position of each input index
    return x, keys.gather(1, order), position[:, memory.shape[1] :]


class RecurrentDecoder(nn.Module):
    """What both recurrent decoders share: the embeddings, the sequence of :func:`interleave`, the head.

    ``forward(memory, memory_units, memory_pos, query_units, query_pos, grid) -> (B, Lq, P)`` as
    :class:`~mal.pretrain.decoder.ARDecoder`; ``memory`` is a list holding one ``(B, Lm, D)`` tensor (the
    encoder's last block: ARM's memory taps feed the Transformer decoder's cross-attention, which these have not).
    Subclasses build ``2 * depth`` blocks and say how they run over the sequence (:meth:`mix`).
    """

    def __init__(self, encoder_dim: int, patch_dim: int, *, dim: int, depth: int) -> None:
        super().__init__()
        self.dim, self.depth = dim, depth
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.memory_embed = nn.Linear(encoder_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_dim)

    def reset_parameters(self) -> None:
        """The Transformer decoder's initialization of the embeddings and the head; blocks init themselves."""
        nn.init.normal_(self.query_token, std=0.02)
        for lin in (self.memory_embed, self.head):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.norm.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        return {"query_token"}

    def mix(self, x: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """The blocks over the sequence ``x: (B, S, E)`` with the keys of :func:`interleave`. Returns (B, S, E)."""
        raise NotImplementedError

    def forward(
        self,
        memory: list[torch.Tensor],
        memory_units: torch.Tensor,
        memory_pos: torch.Tensor,
        query_units: torch.Tensor,
        query_pos: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """memory: [(B, Lm, D)]; memory_units/memory_pos: (B, Lm); query_units/query_pos: (B, Lq); positions are
        raster indices of ``grid``. Returns (B, Lq, P)."""
        if len(memory) != 1:
            raise ValueError(f"{type(self).__name__} reads one memory (objective.memory=last), got {len(memory)}")
        table = sincos_table(self.dim, *grid, str(memory[0].device)).to(memory[0].dtype)
        mem = self.memory_embed(memory[0]) + table[memory_pos]  # (B, Lm, E)
        queries = self.query_token.to(mem.dtype) + table[query_pos]  # (B, Lq, E)
        x, segment_ids, query_index = interleave(mem, memory_units, queries, query_units)
        x = self.mix(x, segment_ids)
        x = x.gather(1, query_index[..., None].expand(-1, -1, self.dim))  # (B, Lq, E)
        return self.head(self.norm(x))


# ------------------------------------------------------------------------------------------------ mLSTM decoder


class CausalConvMLSTMLayer(ViLLayer):
    """The encoder's :class:`~mal.models.vil.ViLLayer` with the causal 1-D conv of the original xLSTM mLSTM block
    (kernel ``cfg.conv_kernel_size``, left padding) in place of ViL's 3x3 conv in image space: the decoder's
    sequence holds two tokens per patch (memory and query) and has no image layout. ``x: (B, S, E) -> (B, S, E)``.
    """

    def __init__(self, cfg: ViLConfig) -> None:
        super().__init__(cfg)
        inner, k = cfg.inner, cfg.conv_kernel_size
        self.conv = nn.Conv1d(inner, inner, k, groups=inner, bias=True)  # replaces the 2-D conv

    def _conv(self, x: torch.Tensor, seq: object, plan: BlockPlan) -> torch.Tensor:
        """``(B, S, I) -> (B, S, I)``: token ``t`` reads tokens ``t - k + 1 .. t``."""
        return causal_depthwise_conv(x, self.conv.weight, self.conv.bias)


class MLSTMBlock(nn.Module):
    """Pre-norm residual mLSTM block, ``x + layer(norm(x))``, with ViL's norm, layer and initialization.

    ``forward(x (B, S, E), segment_ids (S,) or (B, S)) -> (B, S, E)``: token ``t`` reads every token ``s`` with
    ``segment_ids[s] <= segment_ids[t]`` (the encoder's cluster-causal reading).
    """

    def __init__(self, cfg: ViLConfig) -> None:
        super().__init__()
        self.norm = OffsetLayerNorm(cfg.dim, bias=cfg.norm_bias)
        self.layer = CausalConvMLSTMLayer(cfg)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        self.layer.reset_parameters()

    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        return x + self.layer(self.norm(x), None, BlockPlan(segment_ids=segment_ids))


class MLSTMDecoder(RecurrentDecoder):
    """The xLSTM decoder: ``2 * depth`` :class:`MLSTMBlock` (ViL's layer: inner width ``2 E``, ``num_heads`` mLSTM
    heads, block-diagonal q/k/v, exponential input and sigmoid forget gates) over the sequence of
    :func:`interleave`, segment-causal at unit granularity like the encoder's ``pretrain`` mode."""

    def __init__(
        self, encoder_dim: int, patch_dim: int, *, dim: int = 512, depth: int = 8, num_heads: int = 16,
        backend: str = "auto",
    ) -> None:  # fmt: skip
        super().__init__(encoder_dim, patch_dim, dim=dim, depth=depth)
        if (2 * dim) % num_heads:
            raise ValueError(f"mLSTM decoder: inner width {2 * dim} is not divisible by its {num_heads} heads")
        # xLSTM's mLSTM block: expansion 2, causal conv of kernel 4, q/k/v blocks of 4
        cfg = ViLConfig(dim=dim, num_heads=num_heads, expansion=2, conv_kernel_size=4, backend=backend)
        self.blocks = nn.ModuleList(MLSTMBlock(cfg) for _ in range(2 * depth))
        self.reset_parameters()

    def mix(self, x: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        if bool((segment_ids == segment_ids[:1]).all()):  # fixed layouts: one row for the batch, a smaller mask
            segment_ids = segment_ids[0]
        for block in self.blocks:
            x = block(x, segment_ids)
        return x


# ------------------------------------------------------------------------------------------------ Mamba decoder


class MambaBlock(nn.Module):
    """Mamba's residual block ``x + mixer(RMSNorm(x))``. ``x: (B, S, E) -> (B, S, E)``."""

    def __init__(self, dim: int, num_layers: int = 1) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.mixer = MambaMixer(dim, num_layers=num_layers)

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        self.mixer.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class MambaDecoder(RecurrentDecoder):
    """The Mamba decoder: ``2 * depth`` :class:`MambaBlock` over the sequence of :func:`interleave`, causal token
    by token (finer than the unit segments, so nothing it reads is later than what the segments allow)."""

    def __init__(self, encoder_dim: int, patch_dim: int, *, dim: int = 512, depth: int = 8) -> None:
        super().__init__(encoder_dim, patch_dim, dim=dim, depth=depth)
        self.blocks = nn.ModuleList(MambaBlock(dim, num_layers=2 * depth) for _ in range(2 * depth))
        self.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        # mamba_ssm exempts A_log and D (D is 1-D, exempt anyway): decay would pull the state decay rates to 1
        return super().no_weight_decay() | {f"blocks.{i}.mixer.scans.0.A_log" for i in range(len(self.blocks))}

    def mix(self, x: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


# ------------------------------------------------------------------------------------------ the paper's decoder


class PaperDecoder(nn.Module):
    """MAL-v2 §3.3.3's decoder in a leak-free reading (docs/DESIGN.md, "Pretraining decoder and objective"): causal
    self-attention blocks over ``g = e + h`` and an MLP last layer. The paper adds the encoder output ``h`` of a
    token to its own position ``e``, which would hand the decoder its target; here the slot of a target patch ``p``
    of unit ``k`` holds ``g_p = e_p + h_{k-1}``: its own sin-cos position plus the encoder's output for the unit
    before (the mean over unit ``k - 1``'s tokens, after a linear map: units may differ in size), and a slot sees
    the slots of units ``<= k`` (block-causal). So everything a prediction of unit ``k`` reads comes from units
    ``< k``. Unit 0 is never predicted; its slots (ragged random batches only) hold a learned token (``query_token``).
    ``forward(...) -> (B, Lq, P)`` as :class:`~mal.pretrain.decoder.ARDecoder`, with one memory (the last block).
    """

    def __init__(
        self, encoder_dim: int, patch_dim: int, *, dim: int = 512, depth: int = 8, num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.dim, self.depth = dim, depth
        self.memory_embed = nn.Linear(encoder_dim, dim)
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, patch_dim))  # the MLP last layer
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.query_token, std=0.02)
        init_transformer_(self)

    def no_weight_decay(self) -> set[str]:
        return {"query_token"}

    def forward(
        self,
        memory: list[torch.Tensor],
        memory_units: torch.Tensor,
        memory_pos: torch.Tensor,
        query_units: torch.Tensor,
        query_pos: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """memory: [(B, Lm, D)]; memory_units/memory_pos: (B, Lm); query_units/query_pos: (B, Lq). Returns
        (B, Lq, P)."""
        if len(memory) != 1:
            raise ValueError(f"the paper decoder reads one memory (objective.memory=last), got {len(memory)}")
        h = self.memory_embed(memory[0])  # (B, Lm, E)
        B, _, E = h.shape
        U = int(max(int(memory_units.max()), int(query_units.max()))) + 1
        sums = h.new_zeros(B, U, E).scatter_add(1, memory_units[..., None].expand(-1, -1, E), h)
        counts = torch.zeros(B, U, dtype=h.dtype, device=h.device).scatter_add(
            1, memory_units, torch.ones_like(memory_units, dtype=h.dtype)
        )
        means = sums / counts.clamp(min=1)[..., None]  # (B, U, E): unit u's mean encoder output
        prev = (query_units - 1).clamp(min=0)
        g = means.gather(1, prev[..., None].expand(-1, -1, E))  # (B, Lq, E): the unit before each query's
        g = torch.where((query_units == 0)[..., None], self.query_token.to(g.dtype), g)
        table = sincos_table(self.dim, *grid, str(h.device)).to(h.dtype)
        x = g + table[query_pos]
        mask = query_units[:, None, :] <= query_units[:, :, None]  # (B, Lq, Lq): units <= one's own
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def build_decoder(
    kind: str,
    encoder_dim: int,
    patch_dim: int,
    *,
    dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    num_memories: int = 1,
    memory_index: list[int] | None = None,
) -> nn.Module:
    """The autoregressive decoder ``objective.decoder`` names (:data:`DECODER_KINDS`): ``transformer``
    (:class:`~mal.pretrain.decoder.ARDecoder`, the only one that reads several memories), ``mlstm``
    (:class:`MLSTMDecoder`, ``num_heads`` mLSTM heads), ``mamba`` (:class:`MambaDecoder`) or ``paper``
    (:class:`PaperDecoder`, MAL-v2 §3.3.3 read leak-free). ``mlp_ratio`` is the Transformers'; the recurrent blocks
    have no MLP."""
    if kind == "transformer":
        return ARDecoder(
            encoder_dim, patch_dim, dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            num_memories=num_memories, memory_index=memory_index,
        )  # fmt: skip
    if kind not in DECODER_KINDS:
        raise ValueError(f"unknown decoder {kind!r}; valid: {', '.join(DECODER_KINDS)}")
    if num_memories != 1:
        raise ValueError(f"the {kind} decoder reads the encoder's last block only (objective.memory=last)")
    if kind == "mlstm":
        return MLSTMDecoder(encoder_dim, patch_dim, dim=dim, depth=depth, num_heads=num_heads)
    if kind == "paper":
        return PaperDecoder(encoder_dim, patch_dim, dim=dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
    return MambaDecoder(encoder_dim, patch_dim, dim=dim, depth=depth)
