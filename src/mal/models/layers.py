"""Building blocks shared by the encoders and decoders: norms, patch/position embeddings, drop path, structured
projections, masked multi-head attention.

Shapes: ``B`` batch, ``L`` tokens, ``D`` width, ``Gh x Gw`` patch grid.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class OffsetLayerNorm(nn.Module):
    """LayerNorm whose scale is stored as an offset: effective scale = ``1 + weight`` (ViL/xLSTM convention).

    ``x: (..., D) -> (..., D)``. Weight (and bias) start at zero, so a fresh norm is the identity affine map.
    """

    def __init__(self, dim: int, *, bias: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), 1.0 + self.weight, self.bias, self.eps)


class MultiHeadNorm(nn.Module):
    """Per-token group norm with one group per head, offset scale (``1 + weight``).

    ``x: (B, L, NH, DH) -> (B, L, NH * DH)``. Each token is normalised on its own (never across tokens), which
    keeps the cluster-causal mode free of leaks.
    """

    def __init__(self, dim: int, num_heads: int, *, bias: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, NH, DH = x.shape
        x = F.layer_norm(x, (DH,), eps=self.eps).reshape(B, L, NH * DH)
        x = x * (1.0 + self.weight)
        return x if self.bias is None else x + self.bias


class BlockDiagonalLinear(nn.Module):
    """Linear map with a block-diagonal weight: ``num_blocks`` independent ``b x b`` blocks.

    ``x: (..., num_blocks * b) -> (..., num_blocks * b)``; ``out[blk, o] = sum_d x[blk, d] * W[blk, o, d] + bias``.
    Weight layout ``(num_blocks, b, b)`` matches the official ViL ``LinearHeadwiseExpand``.
    """

    def __init__(self, dim: int, block_size: int, *, bias: bool = True) -> None:
        super().__init__()
        if dim % block_size:
            raise ValueError(f"width {dim} is not divisible by the projection block size {block_size}")
        self.dim = dim
        self.block_size = block_size
        self.weight = nn.Parameter(torch.empty(dim // block_size, block_size, block_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    #: On CUDA, up to this width one dense matmul with the expanded block-diagonal weight (the form the GPU
    #: benchmarks of docs/BENCHMARKS.md were measured with); wider: the multiply-add chain.
    DENSE_MAX_DIM = 256
    #: CPU ``bmm`` form: above this many tokens, slices of ``BMM_ROWS`` tokens. Measured at 2 threads, width 384,
    #: ms per call: 6272 tokens (ViL-T at 448 px) 12.8 -> 8.7, 25088 tokens 108 -> 66, 1568 tokens unchanged.
    BMM_ROWS_SPLIT = 2048
    BMM_ROWS = 512

    def method(self, x: torch.Tensor) -> str:
        """How ``forward`` computes: on CPU in eager mode a batched matmul, ``channels_first`` when ``x`` is the
        transposed view of a channels-first tensor (``x.mT`` contiguous: the token axis innermost, where each block
        is one matmul with the token axis as its wide side, and the output comes in the same layout) and ``bmm``
        otherwise (the fastest token-major form there at every width measured, forward and backward: ViL-T's 384 x
        1568 tokens at 2 threads took 1.2 / 4.1 ms fwd / fwd+bwd against 3.2 / 14.8 for the chain and 3.5 / 11.1
        dense); ``dense`` or ``chain`` elsewhere and under ``torch.compile``, where the chain fuses into one kernel
        and a bmm of tiny matrices does not."""
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            return "channels_first" if x.dim() >= 2 and x.shape[-2] > 1 and x.mT.is_contiguous() else "bmm"
        return "dense" if self.dim <= self.DENSE_MAX_DIM else "chain"

    def forward(self, x: torch.Tensor, method: str | None = None) -> torch.Tensor:
        nb, b, _ = self.weight.shape
        method = method or self.method(x)
        if method == "dense":
            return F.linear(x, torch.block_diag(*self.weight), self.bias)
        if method == "channels_first":  # (n nb, b, b) @ (n nb, b, L) over the n = numel / (L C) leading entries
            L = x.shape[-2]
            xc = x.mT.reshape(-1, b, L)  # a view when x.mT is contiguous
            w = self.weight.repeat(xc.shape[0] // nb, 1, 1)  # small: (n nb, b, b)
            if self.bias is None:
                out = torch.bmm(w, xc)
            else:
                out = torch.baddbmm(self.bias.view(nb, b, 1).repeat(xc.shape[0] // nb, 1, 1), w, xc)
            return out.view(*x.shape[:-2], nb * b, L).mT  # (..., L, C), channels-first like x
        if method == "bmm":  # (nb, N, b) @ (nb, b, b)^T: one batched matmul over the blocks
            flat = x.reshape(-1, nb * b)
            wt = self.weight.transpose(1, 2)
            if flat.shape[0] <= self.BMM_ROWS_SPLIT:
                out = torch.bmm(flat.view(-1, nb, b).transpose(0, 1), wt).transpose(0, 1).reshape(x.shape)
            else:  # token slices: the strided reads and the transposing copy stay in cache
                out = flat.new_empty(flat.shape)
                for i in range(0, flat.shape[0], self.BMM_ROWS):
                    part = flat[i : i + self.BMM_ROWS].view(-1, nb, b).transpose(0, 1)
                    out[i : i + self.BMM_ROWS].view(-1, nb, b).copy_(torch.bmm(part, wt).transpose(0, 1))
                out = out.view(x.shape)
        elif method == "chain":  # b multiply-adds over broadcast views
            xb = x.reshape(*x.shape[:-1], nb, b)
            out = xb[..., 0:1] * self.weight[:, :, 0]
            for d in range(1, b):
                out = out + xb[..., d : d + 1] * self.weight[:, :, d]
            out = out.reshape(x.shape)
        else:
            raise ValueError(f"unknown block-diagonal method {method!r}; known: bmm, channels_first, chain, dense")
        return out if self.bias is None else out + self.bias


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding. ``x: (B, C, H, W) -> (B, Gh, Gw, D)``."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def reset_parameters(self) -> None:
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on the flattened kernel (ViT/MAE)
        nn.init.zeros_(self.proj.bias)

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid of an image batch, with clear errors for bad input."""
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        _, C, H, W = x.shape
        if self.in_chans != C:
            raise ValueError(f"expected {self.in_chans} input channels, got {C} (input shape {tuple(x.shape)})")
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
        return H // p, W // p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid(x)
        return self.proj(x).permute(0, 2, 3, 1)


def resize_pos_embed(embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a grid position embedding ``(1, Gh, Gw, D) -> (1, gh, gw, D)``.

    ``align_corners=False`` and no antialias, as the official ViL code.
    """
    if tuple(embed.shape[1:3]) == tuple(grid):
        return embed
    out = F.interpolate(embed.permute(0, 3, 1, 2), size=grid, mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1)


class PosEmbed2d(nn.Module):
    """Learned 2-D position embedding stored as a grid ``(1, Gh, Gw, D)``.

    ``x: (B, gh, gw, D) -> (B, gh, gw, D)``; a different grid at run time uses a bicubic resize, and a state dict
    saved at another resolution is resized when loaded.
    """

    def __init__(self, grid: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, grid[0], grid[1], dim))

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + resize_pos_embed(self.embed, (x.shape[1], x.shape[2]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        key = prefix + "embed"
        if key in state_dict and state_dict[key].shape != self.embed.shape:
            old = tuple(state_dict[key].shape)
            if state_dict[key].ndim != 4 or state_dict[key].shape[-1] != self.embed.shape[-1]:
                raise ValueError(
                    f"position embedding {key} has shape {old}, expected (1, Gh, Gw, {self.embed.shape[-1]})"
                )
            state_dict[key] = resize_pos_embed(state_dict[key], tuple(self.embed.shape[1:3]))
            log.info("resized position embedding %s from %s to %s", key, old, tuple(self.embed.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class DropPath(nn.Module):
    """Stochastic depth on a residual branch, per sample, scaled by the keep probability.

    ``x: (B, ...) -> (B, ...)``.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


def small_init_(w: torch.Tensor, dim: int) -> torch.Tensor:
    """N(0, sqrt(2 / (5 dim))) (Nguyen & Salazar 2019, as the official mLSTM)."""
    return nn.init.normal_(w, std=math.sqrt(2 / (5 * dim)))


def wang_init_(w: torch.Tensor, dim: int, num_blocks: int = 1) -> torch.Tensor:
    """N(0, 2 / num_blocks / sqrt(dim)) (Wang 2021, GPT-NeoX; the official mLSTM uses num_blocks=1)."""
    return nn.init.normal_(w, std=2 / num_blocks / math.sqrt(dim))


class Attention(nn.Module):
    """Multi-head attention with an optional boolean mask, on :func:`torch.nn.functional.scaled_dot_product_attention`
    (the ViT encoder, the pixel decoders)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        # no key bias: it adds the same score to every key of a query, so softmax cancels it and its gradient is
        # rounding noise that Adam would blow up to lr-sized steps
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, Lq, E) queries; context: (B, Lk, E); mask: (B or 1, Lq, Lk) bool (True = may attend) or None
        (full attention). Returns (B, Lq, E)."""
        B, Lq, E = x.shape
        h = self.num_heads
        q = self.q(x).view(B, Lq, h, E // h).transpose(1, 2)  # (B, h, Lq, E/h)
        k, v = self.kv(context).view(B, -1, 2, h, E // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, Lk, E/h)
        v = v + self.v_bias.view(h, 1, E // h)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.proj(out.transpose(1, 2).reshape(B, Lq, E))


def init_transformer_(module: nn.Module) -> None:
    """MAE initialization: xavier-uniform linear weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
