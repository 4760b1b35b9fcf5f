"""Our fused chunkwise mLSTM in Triton (backend ``"triton"``): causal, cluster-causal (segmented) and reversed.

It computes the stabilised formula of :mod:`mal.kernels.parallel` and its exact gradients (the gradient of the
same function that autograd gives through the ``parallel`` backend, normaliser and stabiliser included), with
memory linear in S.

Chunks and reads. The scan is cut into chunks of ``L`` positions (a power of two in [16, 128]). Token t reads the
memory at ``r(t)``, the last position of its segment (``r(t) = t`` without segments); it is handled by the chunk
that holds ``r(t)``, which reads the keys ``s`` of that chunk with ``s <= r(t)`` and the state at the chunk start
(everything before). Since ``r`` is non-decreasing, the queries of chunk c are a contiguous range of tokens,
``[start of the segment holding c L, start of the segment holding (c + 1) L)``, which may be empty (a segment
that covers the whole chunk) or longer than ``L`` (a segment that ends in it after starting chunks earlier): the
kernel loops over it in tiles. So the chunk grid stays regular (no packing of segments into chunks) and the
segmented case costs what the causal one costs.

Log-space bookkeeping per chunk (``b_j``: cumulative log forget gate from the chunk start, so no long cumulative
sums are differenced; ``M_c``: log-scale of the state at the chunk start, ``-inf`` for chunk 0)::

    ul_j  = igate_j - b_j                       key log-weight (the chunk's frame)
    U_j   = max_{i <= j} ul_i                   running maximum inside the chunk
    Ve_c  = max(M_c, U_{L-1}),  M_{c+1} = b_{L-1} + Ve_c
    V_t   = max(M_c, U_{r(t)}),  m_t = b_{r(t)} + V_t      (m_t is the parallel form's row stabiliser)

These ``(B, NH, S)``-sized terms are computed here in PyTorch, so autograd carries their gradients back to the
gates; the kernels take them as inputs and return their gradients. The kernels (see ``_triton_kernels.py``):

* ``state_fwd``: ``C_{c+1} = exp(M_c - Ve_c) C_c + sum_j exp(ul_j - Ve_c) k_j v_j^T`` (and ``n``), one program per
  (batch, head) looping over chunks, each step one ``tl.dot``;
* ``chunk_fwd``: one program per (chunk, batch, head): ``P = (q k^T) * exp(ul_j - V_t)`` masked to ``j <= r(t)``,
  ``h = (P v + exp(M_c - V_t) q C_c) / (max(|z|, exp(-m)) + eps)``;
* backward: ``state_fwd`` again (the states are recomputed, not stored), ``state_bwd`` (the gradients of the
  chunk-start states, from the last chunk to the first) and ``chunk_bwd`` (dq of the chunk's queries, dk and dv of
  its keys: no atomics). The stabilisers only scale linear terms, which gives their gradients cheaply:
  ``dV_t = -q_t . dq_t``, ``dul_j = k_j . dk_j``, ``dM_c = <dC_c, C_c> + <dn_c, n_c>`` and ``dVe_c = -dM_{c+1}``.

Head dims: up to 256, padded to a power of two inside (at least 16). Each program holds a whole ``(DH, DH)`` state
tile (float32), so 128 (ViL-T's 96 padded) is the intended range; ``backend="auto"`` picks this backend only up to
``mal.kernels.TRITON_AUTO_MAX_HEAD_DIM``. Larger heads (ViL-S 192, ViL-B 384) would need the key dimension tiled too.

Dtypes: float32 inputs are computed with IEEE float32 dots (TF32 when ``torch.set_float32_matmul_precision`` allows
it; IEEE float32 dots are slow on tensor-core GPUs, so this is for checks, not training); bf16 / fp16 inputs with
dots on that dtype (float32 accumulation); gates, stabilisers and states are float32 throughout; the output has q's
dtype. float64 inputs are computed in float32 (Triton's dots have no float64) and cast back.

Devices: CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests), which must
be set before this backend first runs. The kernels (and so ``triton``) are imported on first use, never when
``mal.kernels`` is imported (although ``torch._dynamo``, which ``mal.models`` imports, imports ``triton`` itself when
it is installed); without ``triton`` the backend is simply not registered.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from ._utils import exp_neg, prep_gates, segment_ends

MIN_CHUNK = 16  # tl.dot needs every dimension >= 16
MAX_CHUNK = 128
MAX_HEAD_DIM = 256  # (DH, DH) states per program: larger head dims would not fit a program's registers

_kernels: ModuleType | None = None
_available: bool | None = None


def is_installed() -> bool:
    """True if the ``triton`` package can be found (without importing it)."""
    if "triton" in sys.modules:  # imported already (torch._dynamo does), or blocked with None
        return sys.modules["triton"] is not None
    return importlib.util.find_spec("triton") is not None


def interpret_requested() -> bool:
    """True if ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (as Triton reads the variable)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _load() -> ModuleType:
    """Imports the Triton kernels (and so ``triton``) on first use."""
    global _kernels
    if _kernels is None:
        from . import _triton_kernels

        _kernels = _triton_kernels
    return _kernels


def is_available() -> bool:
    """True if CUDA is present and the Triton kernels import. Cached; never raises."""
    global _available
    if _available is None:
        _available = False
        if torch.cuda.is_available() and is_installed():
            try:
                _load()
                _available = True
            except Exception:  # a broken or mismatched triton install means "not available"
                _available = False
    return _available


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def chunk_length(S: int, chunk_size: int) -> int:
    """Chunk length ``L``: ``chunk_size`` rounded up to a power of two in ``[16, 128]``, at most ``S`` rounded up."""
    L = min(MAX_CHUNK, max(MIN_CHUNK, _next_pow2(chunk_size)))
    return min(L, max(MIN_CHUNK, _next_pow2(S)))


@dataclass(frozen=True)
class _Config:
    L: int
    NC: int
    eps: float
    reverse: bool


def _read_positions(
    segment_ids: torch.Tensor | None, S: int, L: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(rd, qs)``: read positions ``r(t)`` ``(B', S)`` and the query range starts of the chunks ``(B', NC + 1)``
    (int32, ``B'`` = 1 for ids shared by the batch), or None for the plain causal case."""
    if segment_ids is None:
        return None
    seg = segment_ids.to(device)
    seg = (seg if seg.dim() == 2 else seg[None]).contiguous()
    rd = segment_ends(seg)
    first = torch.searchsorted(seg, seg, right=False)  # first position of each token's segment
    qs = torch.cat([first[:, ::L], torch.full_like(first[:, :1], S)], dim=1)
    return rd.to(torch.int32).contiguous(), qs.to(torch.int32).contiguous()


def _gate_terms(
    igate: torch.Tensor, fgate: torch.Tensor, read: torch.Tensor | None, cfg: _Config
) -> tuple[torch.Tensor, ...]:
    """Differentiable log-space terms in scan order (see the module docstring), all float32 and contiguous.

    Returns ``ul (B, NH, NC * L)`` (``-inf`` past the sequence end), ``V, m (B, NH, S)`` and ``M, Ve (B, NH, NC)``.
    """
    L, NC = cfg.L, cfg.NC
    ig, logf = prep_gates(igate, fgate, torch.float32)
    if cfg.reverse:
        ig, logf = ig.flip(-1), logf.flip(-1)
    B, NH, S = ig.shape
    pad = NC * L - S
    if pad:
        ig = F.pad(ig, (0, pad), value=float("-inf"))
        logf = F.pad(logf, (0, pad))
    b = logf.unflatten(-1, (NC, L)).cumsum(-1)  # (B, NH, NC, L)
    ul = ig.unflatten(-1, (NC, L)) - b
    U = torch.cummax(ul, dim=-1).values
    U_last = U[..., -1]  # (B, NH, NC); finite: every chunk starts with a real token
    neg_inf = torch.full_like(U_last[..., :1], float("-inf"))
    if NC > 1:
        # M_{c+1} = max_{j <= c} (U_last_j + sum_{i=j}^{c} g_i), g the chunk totals: the closed form of the recurrence
        # M_{c+1} = g_c + max(M_c, U_last_c). Each partial sum is a running sum from its own first term, so nothing
        # is cancelled the way differences of one long cumulative sum would be.
        tri = torch.ones(NC, NC, dtype=torch.bool, device=ig.device).tril()  # [c, j]: j <= c
        Z = (b[..., -1, None] * tri).cumsum(-2)  # [c, j] = sum_{i=j}^{c} g_i (below the diagonal: 0)
        M_next = (U_last[..., None, :] + Z).masked_fill(~tri, float("-inf")).amax(-1)
        M = torch.cat([neg_inf, M_next[..., :-1]], dim=-1)
    else:
        M = neg_inf
    Ve = torch.maximum(M, U_last)
    Uf, bf = U.flatten(-2), b.flatten(-2)
    if read is None:
        Ur, br = Uf[..., :S], bf[..., :S]
        Mr = M.repeat_interleave(L, dim=-1)[..., :S]
    else:
        idx = read.long()[:, None, :].expand(B, NH, S)
        Ur, br, Mr = Uf.gather(-1, idx), bf.gather(-1, idx), M.gather(-1, idx // L)
    V = torch.maximum(Mr, Ur)
    m = br + V
    return tuple(x.contiguous() for x in (ul.flatten(-2), V, m, M, Ve))


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.stride())


def _launch_meta(kern: ModuleType, dtype: torch.dtype, DH: int) -> dict:
    """Compile-time settings shared by the kernels. The tile sizes are not tuned on a GPU yet; they were chosen from
    ptxas' register and shared-memory reports of the sm_90 builds (``chunk_bwd_kernel`` has its own, see
    :func:`_bwd_launch`)."""
    BD = max(MIN_CHUNK, _next_pow2(DH))
    return dict(
        DH=DH,
        BD=BD,
        BV=min(BD, 64),
        DOT=kern.DOT_DTYPES[dtype],
        # float32 follows torch's matmul setting, so that the parity with the cuBLAS backends holds by default
        PREC="ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32",
        INTERPRET=kern.INTERPRET,
        num_warps=4 if BD <= 64 else 8,
    )


def _bwd_launch(meta: dict, L: int) -> dict:
    """``chunk_bwd_kernel`` holds the most tiles at once: smaller query tiles for 128-wide heads and no software
    pipelining (sm_90 builds: fewer register spills, and about 49 KB of shared memory instead of 180 KB, which
    exceeds an A100's 164 KB)."""
    return {**meta, "BQ": min(L, 16 if meta["BD"] >= 128 else 32), "num_stages": 1}


def _states(kern, k, v, ul, M, Ve, cfg: _Config, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-start states ``C (B * NH, NC, BD, BD)`` and ``n (B * NH, NC, BD)``, float32."""
    B, NH, S, _ = k.shape
    BD, BV = meta["BD"], meta["BV"]
    C = torch.empty(B * NH, cfg.NC, BD, BD, dtype=torch.float32, device=k.device)
    n = torch.empty(B * NH, cfg.NC, BD, dtype=torch.float32, device=k.device)
    kern.state_fwd_kernel[(B * NH, BD // BV)](
        k, v, ul, M, Ve, C, n, *_strides(k), *_strides(v), S, cfg.NC, NH, 1.0 / math.sqrt(meta["DH"]),
        L=cfg.L, REVERSE=cfg.reverse, **meta,
    )  # fmt: skip
    return C, n


class _TritonMLSTM(torch.autograd.Function):
    """``h = f(q, k, v, ul, V, m, M, Ve)``; the gate terms come from :func:`_gate_terms` (autograd handles them)."""

    @staticmethod
    def forward(ctx, q, k, v, ul, V, m, M, Ve, rd, qs, cfg: _Config):
        kern = _load()
        B, NH, S, DH = q.shape
        meta = _launch_meta(kern, q.dtype, DH)
        C, n = _states(kern, k, v, ul, M, Ve, cfg, meta)
        # h in (B, S, NH, DH) memory: the caller's transpose back to (B, S, NH * DH) is then free. The Function returns
        # that tensor itself (a view made in here could not be modified in place downstream) and the wrapper transposes.
        h_bsnd = torch.empty(B, S, NH, DH, dtype=q.dtype, device=q.device)
        h = h_bsnd.transpose(1, 2)
        N = torch.empty(B, NH, S, dtype=torch.float32, device=q.device)
        z = torch.empty_like(N)
        seg = rd is not None
        rd_, qs_ = (rd, qs) if seg else (N, N)  # unused placeholders in the causal case
        BD, BV = meta["BD"], meta["BV"]
        kern.chunk_fwd_kernel[(B * NH, cfg.NC, BD // BV)](
            q, k, v, h, ul, V, m, M, C, n, N, z, rd_, qs_,
            *_strides(q), *_strides(k), *_strides(v), *_strides(h),
            rd.stride(0) if seg and rd.shape[0] > 1 else 0, qs.stride(0) if seg and qs.shape[0] > 1 else 0,
            S, cfg.NC, NH, 1.0 / math.sqrt(DH), cfg.eps, _exp_limit(),
            L=cfg.L, BQ=cfg.L, SEGMENTED=seg, REVERSE=cfg.reverse, **meta,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, ul, V, m, M, Ve, N, z, h_bsnd, rd, qs)
        ctx.cfg = cfg
        return h_bsnd

    @staticmethod
    def backward(ctx, dh_bsnd):
        q, k, v, ul, V, m, M, Ve, N, z, h_bsnd, rd, qs = ctx.saved_tensors
        h, dh = h_bsnd.transpose(1, 2), dh_bsnd.transpose(1, 2)  # (B, NH, S, DH) views
        cfg: _Config = ctx.cfg
        kern = _load()
        B, NH, S, DH = q.shape
        meta = _launch_meta(kern, q.dtype, DH)
        BD, BV = meta["BD"], meta["BV"]
        NVT = BD // BV
        # h = A / N with N = max(|z|, exp(-m)) + eps: the gradients of z and m (per token, float32, scan order)
        hd = (dh.float() * h.float()).sum(-1)
        if cfg.reverse:
            hd = hd.flip(-1)
        dN = -hd / N
        en = exp_neg(m)
        z_wins = z.abs() >= en
        dz = torch.where(z_wins, dN * torch.sign(z), 0.0).contiguous()
        dm = torch.where(z_wins | (-m > _exp_limit()), 0.0, -dN * en)  # no gradient where exp_neg clamps
        C, n = _states(kern, k, v, ul, M, Ve, cfg, meta)
        dC = torch.empty_like(C)
        dn = torch.empty_like(n)
        X = torch.empty(B * NH, NVT, cfg.NC, dtype=torch.float32, device=q.device)
        seg = rd is not None
        rd_, qs_ = (rd, qs) if seg else (N, N)
        s_rd = rd.stride(0) if seg and rd.shape[0] > 1 else 0
        s_qs = qs.stride(0) if seg and qs.shape[0] > 1 else 0
        kern.state_bwd_kernel[(B * NH, NVT)](
            q, dh, V, N, dz, M, Ve, C, n, dC, dn, X, qs_,
            *_strides(q), *_strides(dh), s_qs, S, cfg.NC, NH, NVT,
            L=cfg.L, BQ=cfg.L, SEGMENTED=seg, REVERSE=cfg.reverse, **meta,
        )  # fmt: skip
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dul = torch.empty_like(ul)
        dV = torch.empty_like(V)
        kern.chunk_bwd_kernel[(B * NH, cfg.NC)](
            q, k, v, dh, dq, dk, dv, ul, V, N, dz, M, Ve, C, n, dC, dn, dul, dV, rd_, qs_,
            *_strides(q), *_strides(k), *_strides(v), *_strides(dh), *_strides(dq), *_strides(dk), *_strides(dv),
            s_rd, s_qs, S, cfg.NC, NH, 1.0 / math.sqrt(DH),
            L=cfg.L, SEGMENTED=seg, REVERSE=cfg.reverse, **_bwd_launch(meta, cfg.L),
        )  # fmt: skip
        dM = X.sum(1).view(B, NH, cfg.NC)  # dM_0 = 0: chunk 0 has no state
        dVe = torch.cat([-dM[..., 1:], torch.zeros_like(dM[..., :1])], dim=-1)
        return dq, dk, dv, dul, dV, dm, dM, dVe, None, None, None


def _exp_limit() -> float:
    """The clamp of ``exp_neg`` for float32: ``exp(-m)`` uses ``min(-m, limit)``."""
    return math.log(torch.finfo(torch.float32).max) - 2.0


@torch.compiler.disable  # raw Triton launches inside a custom Function: run eagerly, between compiled graphs
def mlstm_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    igate: torch.Tensor,
    fgate: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
    reverse: bool = False,
) -> torch.Tensor:
    """Fused chunkwise mLSTM (Triton), forward and backward.

    Args:
        q, k, v: ``(B, NH, S, DH)`` CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``), any strides;
            ``DH <= 256`` (padded inside to a power of two, at least 16).
        igate, fgate: ``(B, NH, S)`` gate pre-activations.
        segment_ids: optional ``(S,)`` or ``(B, S)`` non-decreasing ids (cluster-causal reading: token t reads
            the memory at the end of its own segment). Validated by ``mal.kernels.mlstm``.
        chunk_size: rounded up to a power of two in ``[16, 128]`` (see :func:`chunk_length`).
        eps: added to the normaliser.
        reverse: scan from the end (token t reads s >= t), without segments; the kernels index the sequence
            backwards, so nothing of size ``(B, NH, S, DH)`` is flipped.

    Returns:
        h: ``(B, NH, S, DH)`` in the dtype of ``q`` (a view of a ``(B, S, NH, DH)`` tensor).
    """
    if reverse and segment_ids is not None:
        raise ValueError("reverse=True takes no segment_ids")
    kern = _load() if q.device.type == "cuda" or interpret_requested() else None
    if kern is None or (q.device.type != "cuda" and not kern.INTERPRET):
        raise ValueError(
            f"backend 'triton' needs CUDA tensors, got device {q.device} (CPU tensors run only in Triton's "
            "interpreter: set TRITON_INTERPRET=1 before triton is first imported)"
        )
    B, NH, S, DH = q.shape
    if DH > MAX_HEAD_DIM:
        raise ValueError(f"backend 'triton' supports head dims up to {MAX_HEAD_DIM}, got {DH}")
    out_dtype = q.dtype
    dtype = out_dtype if out_dtype in kern.DOT_DTYPES else torch.float32
    q, k, v = (t.to(dtype) for t in (q, k, v))
    L = chunk_length(S, int(chunk_size))
    cfg = _Config(L=L, NC=-(-S // L), eps=float(eps), reverse=bool(reverse))
    read = _read_positions(segment_ids, S, L, q.device)
    rd, qs = read if read is not None else (None, None)
    ul, V, m, M, Ve = _gate_terms(igate, fgate, rd, cfg)
    h = _TritonMLSTM.apply(q, k, v, ul, V, m, M, Ve, rd, qs, cfg)  # (B, S, NH, DH)
    return h.transpose(1, 2).to(out_dtype)
