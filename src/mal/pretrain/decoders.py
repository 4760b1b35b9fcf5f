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

import math

import torch
import torch.nn.functional as F
from torch import nn

from mal.models.layers import OffsetLayerNorm
from mal.models.vil import BlockPlan, ViLConfig, ViLLayer
from mal.pretrain.decoder import ARDecoder, sincos_table

#: The values of ``objective.decoder``.
DECODER_KINDS = ("transformer", "mlstm", "mamba")


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
        k = self.conv.kernel_size[0]
        return self.conv(F.pad(x.transpose(1, 2), (k - 1, 0))).transpose(1, 2)


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


class SelectiveScan(torch.autograd.Function):
    """The recurrence of :func:`selective_scan` with a hand-written backward, one step per token.

    Through autograd, the ``(B, S, I, N)`` tensors of the vectorized form (decays, drives, states and their
    gradients) each stream through memory several times. Here a step works on one ``(B, I, N)`` state, which stays
    in cache, and only the states are kept for the backward (the decays are recomputed): at the digits decoder's
    shape (B 64, S 120, I 256, N 16) on one CPU thread, forward + backward 0.3 s instead of 0.8-1.0 s.
    Time-major inputs: u, delta (S, B, I); A (I, N); B, C (S, B, N); all of one float dtype. Returns y (S, B, I)
    without the ``D u`` term. Gradients for all five inputs; no double backward.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):  # noqa: D102 (documented on the class)
        with torch.autocast(u.device.type, enabled=False):
            S, Bn, I = u.shape
            du = delta * u  # (S, B, I)
            states = u.new_empty(S, Bn, I, A.shape[1])  # h_t, kept for the backward
            for t in range(S):
                drive = du[t, :, :, None] * B[t, :, None, :]  # (B, I, N)
                if t == 0:
                    states[0] = drive
                else:
                    torch.addcmul(drive, torch.exp(delta[t, :, :, None] * A), states[t - 1], out=states[t])
            y = torch.einsum("sbin,sbn->sbi", states, C)
        ctx.save_for_backward(u, delta, A, B, C, states)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # noqa: D102
        u, delta, A, B, C, states = ctx.saved_tensors
        with torch.autocast(u.device.type, enabled=False):
            gy = gy.to(u.dtype)
            S = u.shape[0]
            du = delta * u
            g_C = torch.einsum("sbi,sbin->sbn", gy, states)  # y_t = C_t . h_t
            g_du, g_delta, g_B = torch.empty_like(u), torch.zeros_like(delta), torch.empty_like(B)
            g_A = torch.zeros_like(A)
            g_h = torch.zeros_like(states[0])  # dL/dh_t, (B, I, N), carried backward in time
            for t in range(S - 1, -1, -1):
                g_h.addcmul_(gy[t, :, :, None], C[t, :, None, :])
                # h_t = a_t * h_{t-1} + du_t B_t
                g_du[t] = torch.bmm(g_h, B[t, :, :, None]).squeeze(-1)
                g_B[t] = torch.bmm(du[t, :, None, :], g_h).squeeze(1)
                if t > 0:  # a_0 multiplies h_{-1} = 0: no gradient
                    a = torch.exp(delta[t, :, :, None] * A)  # (B, I, N)
                    g_log_a = g_h * states[t - 1] * a  # through a = exp(delta A)
                    g_delta[t] = (g_log_a * A).sum(-1)
                    g_A += torch.einsum("bin,bi->in", g_log_a, delta[t])
                    g_h = g_h * a
            g_delta += g_du * u
            g_u = g_du * delta
        return g_u, g_delta, g_A, g_B, g_C


def selective_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor
) -> torch.Tensor:
    """Mamba's selective scan (S6, Gu & Dao 2023, Algorithm 2) in plain PyTorch, zero-order-hold ``A`` and Euler
    ``B`` as the reference ``selective_scan_ref`` of ``mamba_ssm``::

        h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t        (per channel i: a diagonal (N,) state)
        y_t = C_t . h_t + D u_t

    u, delta: (B, S, I) (``delta`` after its softplus); A: (I, N) (negative); B, C: (B, S, N); D: (I,).
    Returns y (B, S, I) in the dtype of ``u``; the state runs in float32 at least (half inputs under autocast).
    One Python step per token (:class:`SelectiveScan`): fine for the decoder's sequences of a few hundred tokens.
    """
    dtype = u.dtype
    acc = torch.promote_types(dtype, torch.float32)
    u, delta, B, C = (t.to(acc).transpose(0, 1).contiguous() for t in (u, delta, B, C))  # time-major
    y = SelectiveScan.apply(u, delta, A.to(acc), B, C) + u * D.to(acc)  # (S, B, I)
    return y.transpose(0, 1).to(dtype)


class MambaMixer(nn.Module):
    """The Mamba (v1) mixer: in-projection to ``x, z`` of width ``I = expand * E``, causal depthwise conv and SiLU
    on ``x``, input-dependent ``delta`` (rank ``R = ceil(E / 16)``), ``B``, ``C``; :func:`selective_scan`; gate
    ``y * silu(z)``; out-projection. Hyperparameters and initialization are those of ``mamba_ssm``'s ``Mamba``
    (``d_state=16, d_conv=4, expand=2``, ``delta`` bias so that ``softplus(bias)`` is log-uniform in
    [1e-3, 0.1], ``A = -(1 .. N)`` per channel, ``D = 1``). ``x: (B, S, E) -> (B, S, E)``, causal along S.
    """

    def __init__(
        self, dim: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2, num_layers: int = 1
    ) -> None:  # fmt: skip
        super().__init__()
        self.inner, self.d_state, self.num_layers = expand * dim, d_state, num_layers
        self.dt_rank = math.ceil(dim / 16)
        inner = self.inner
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv1d(inner, inner, d_conv, groups=inner, bias=True)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, d_state))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        for lin in (self.in_proj, self.x_proj, self.out_proj):
            lin.reset_parameters()
        self.conv.reset_parameters()
        with torch.no_grad():
            # Mamba LM: residual out-projections scaled by 1/sqrt(number of layers) (GPT-2's prenorm rescaling)
            self.out_proj.weight /= math.sqrt(self.num_layers)
            std = self.dt_rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.inner, -1))
            self.D.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, R = self.d_state, self.dt_rank
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, S, I) each
        k = self.conv.kernel_size[0]
        u = F.silu(self.conv(F.pad(u.transpose(1, 2), (k - 1, 0))).transpose(1, 2))  # causal: t reads t-k+1 .. t
        dt, B, C = self.x_proj(u).split([R, N, N], dim=-1)  # (B, S, R), (B, S, N), (B, S, N)
        delta = F.softplus(self.dt_proj(dt))  # (B, S, I)
        y = selective_scan(u, delta, -torch.exp(self.A_log), B, C, self.D)
        return self.out_proj(y * F.silu(z))


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
        return super().no_weight_decay() | {f"blocks.{i}.mixer.A_log" for i in range(len(self.blocks))}

    def mix(self, x: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


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
    (:class:`MLSTMDecoder`, ``num_heads`` mLSTM heads) or ``mamba`` (:class:`MambaDecoder`). ``mlp_ratio`` is the
    Transformer's; the recurrent blocks have no MLP."""
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
    return MambaDecoder(encoder_dim, patch_dim, dim=dim, depth=depth)
