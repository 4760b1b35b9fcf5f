"""Chunkwise stabilised mLSTM: linear memory in S.

The sequence is cut into chunks. Per chunk ``c`` (local positions ``j = 0..L-1``) with local cumulative log
forget gates ``b_j = sum_{i <= j} log f_i`` and chunk total ``g_c = b_{L-1}``:

* inter-chunk recurrence over ``(DH x DH)`` states at chunk boundaries, in log space::

      w_s       = g_c - b_s + igate_s                       (decay of token s to the chunk end)
      mloc_c    = max_s w_s
      M_{c+1}   = max(g_c + M_c, mloc_c)                    (M_0 = -inf, C_0 = 0, n_0 = 0)
      C_{c+1}   = exp(g_c + M_c - M_{c+1}) C_c + exp(mloc_c - M_{c+1}) sum_s exp(w_s - mloc_c) k_s v_s^T
      n_{c+1}   = (same with k_s)

  The true (unstabilised) state at the start of chunk ``c`` is ``exp(M_c) * (C_c, n_c)`` and ``M_c`` is
  exactly ``max_{s before chunk c} (F_{end(c-1)} - F_s + igate_s)``. Implementation detail: with
  ``u_s = igate_s - b_s`` and ``U = cummax(u)`` inside the chunk, ``mloc_c = g_c + U_{L-1}``.

* intra-chunk parallel part with ``log D[t, s] = b_{r(t)} - b_s + igate_s`` for allowed pairs
  (``seg(s) <= seg(t)`` inside the chunk), and the inter contribution of query t with log-scale
  ``a_t = b_{r(t)} + M_c``. The row stabiliser is ``m_t = max(a_t, max_s log D[t, s])
  = b_{r(t)} + max(M_c, U_{r(t)})``, which is the parallel form's ``m_t``, so all backends agree to
  round-off (this matters because of the ``+ eps`` in the normaliser).

Segmented inputs: chunks are aligned to segments by greedily packing whole consecutive segments into
chunks of at most ``chunk_size`` tokens (a longer segment is a chunk of its own), so ``r(t)`` always lies in
t's chunk. Every chunk is padded to the common maximal chunk length with dummy tokens (zero q/k/v,
``log f = 0``, ``igate = -inf``, masked out of every pair) that contribute nothing and whose outputs are
dropped. The plain causal case is "every segment has length 1", cut into chunks of ``causal_chunk_length``
tokens: a divisor of S when one is close to the balanced length (no dummy slots: 784 tokens -> 14 x 56),
otherwise ``NC = ceil(S / chunk_size)`` balanced chunks of ``ceil(S / NC) <= chunk_size`` tokens (the last
one padded, at most ``NC - 1`` dummy slots). With ``(B, S)`` segment ids the packing is computed per sample
and gathered with an index tensor (padded to the maximal number of chunks / chunk length over the batch).

Only small index tensors are cached, keyed by (segment boundaries, chunk_size, device).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ._utils import acc_dtype, decay_exp_, decay_factors, exp_neg, finite_or_zero, prep_gates, running_max


@dataclass(frozen=True)
class ChunkLayout:
    """Index tensors describing how tokens are placed into chunks.

    Shapes use ``P`` = ``()`` for a layout shared by the batch, ``(B,)`` for per-sample layouts.

    Attributes:
        NC, L: number of chunks and (padded) chunk length.
        contiguous: chunks are the plain sequence cut every L tokens (pads only at the end): no gather.
        idx: ``P + (NC * L,)`` source position of each chunk slot (``S`` = dummy token), or None if contiguous.
        inv: ``P + (S,)`` flat slot of each source token, or None if contiguous.
        rloc: ``P + (NC, L)`` local index of the end of the slot's segment, or None when it is the identity.
        not_allowed: ``(NC, L, L)`` or ``(B, 1, NC, L, L)`` boolean, True where the pair (t, s) is masked.
        causal: plain causal layout (no segments): the dummy slots sit at the end of their chunk and hold zero
            q and k, so masking the upper triangle (``tril_``, much faster than ``masked_fill_``) is exact.
    """

    NC: int
    L: int
    contiguous: bool
    idx: torch.Tensor | None
    inv: torch.Tensor | None
    rloc: torch.Tensor | None
    not_allowed: torch.Tensor
    causal: bool = False


_LAYOUT_CACHE: dict[tuple, ChunkLayout] = {}
_LAYOUT_CACHE_MAX = 64


def pack_segments(sizes: np.ndarray | list[int], chunk_size: int) -> list[list[int]]:
    """Greedily packs whole consecutive segments into chunks of at most ``chunk_size`` tokens.

    A segment longer than ``chunk_size`` becomes a chunk of its own. Returns the segment sizes per chunk.
    """
    chunks: list[list[int]] = []
    cur: list[int] = []
    cur_len = 0
    for size in (int(s) for s in sizes):
        if cur and cur_len + size > chunk_size:
            chunks.append(cur)
            cur, cur_len = [], 0
        cur.append(size)
        cur_len += size
    if cur:
        chunks.append(cur)
    return chunks


def _sample_arrays(sizes: np.ndarray, chunk_size: int) -> tuple[np.ndarray, ...]:
    """Per-token placement for one sample: (chunk, slot, local segment number, local segment end)."""
    chunks = pack_segments(sizes, chunk_size)
    nseg = len(sizes)
    seg_chunk = np.empty(nseg, dtype=np.int64)  # chunk of each segment
    seg_off = np.empty(nseg, dtype=np.int64)  # slot offset of each segment inside its chunk
    seg_local = np.empty(nseg, dtype=np.int64)  # segment number inside its chunk
    si = 0
    for c, chunk in enumerate(chunks):
        off = 0
        for u, size in enumerate(chunk):
            seg_chunk[si], seg_off[si], seg_local[si] = c, off, u
            off += size
            si += 1
    seg_of_tok = np.repeat(np.arange(nseg), sizes)
    seg_start = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    pos_in_seg = np.arange(int(sizes.sum())) - seg_start[seg_of_tok]
    tok_chunk = seg_chunk[seg_of_tok]
    tok_slot = seg_off[seg_of_tok] + pos_in_seg
    tok_segloc = seg_local[seg_of_tok]
    tok_rloc = (seg_off + sizes - 1)[seg_of_tok]
    lens = [sum(c) for c in chunks]
    return tok_chunk, tok_slot, tok_segloc, tok_rloc, len(chunks), max(lens)


def build_layout(change: np.ndarray, chunk_size: int, device: torch.device) -> ChunkLayout:
    """Builds the chunk layout from segment boundaries.

    Args:
        change: bool array ``(S - 1,)`` (shared) or ``(B, S - 1)`` (per sample); True where a new segment
            starts at position ``i + 1``.
        chunk_size: maximal tokens per chunk (longer segments get a chunk of their own).
        device: where the index tensors live.
    """
    shared = change.ndim == 1
    rows = change[None] if shared else change
    S = rows.shape[1] + 1
    per = []
    for row in rows:
        starts = np.concatenate(([0], np.flatnonzero(row) + 1, [S]))
        per.append(_sample_arrays(np.diff(starts), chunk_size))
    NC = max(p[4] for p in per)
    L = max(p[5] for p in per)
    nb = len(per)
    idx = np.full((nb, NC, L), S, dtype=np.int64)
    valid = np.zeros((nb, NC, L), dtype=bool)
    segloc = np.zeros((nb, NC, L), dtype=np.int64)
    rloc = np.broadcast_to(np.arange(L), (nb, NC, L)).copy()
    inv = np.empty((nb, S), dtype=np.int64)
    toks = np.arange(S)
    for b, (tc, ts, tsl, tr, _, _) in enumerate(per):
        idx[b, tc, ts] = toks
        valid[b, tc, ts] = True
        segloc[b, tc, ts] = tsl
        rloc[b, tc, ts] = tr
        inv[b] = tc * L + ts
    contiguous = bool(shared and np.array_equal(inv[0], toks))
    rloc_identity = bool((rloc == np.arange(L)).all())
    if shared:
        idx, valid, segloc, rloc, inv = idx[0], valid[0], segloc[0], rloc[0], inv[0]
    valid_t = torch.from_numpy(valid).to(device)
    segloc_t = torch.from_numpy(segloc).to(device)
    allowed = valid_t[..., :, None] & valid_t[..., None, :] & (segloc_t[..., None, :] <= segloc_t[..., :, None])
    not_allowed = ~allowed
    if not shared:
        not_allowed = not_allowed[:, None]  # (B, 1, NC, L, L)
    return ChunkLayout(
        NC=NC,
        L=L,
        contiguous=contiguous,
        idx=None if contiguous else torch.from_numpy(idx.reshape(*idx.shape[:-2], NC * L)).to(device),
        inv=None if contiguous else torch.from_numpy(inv).to(device),
        rloc=None if rloc_identity else torch.from_numpy(rloc).to(device),
        not_allowed=not_allowed,
    )


def causal_chunk_length(S: int, chunk_size: int) -> int:
    """Chunk length of the plain causal layout.

    The balanced length ``ceil(S / NC)`` with ``NC = ceil(S / chunk_size)`` needs up to ``NC - 1`` dummy slots,
    and padding copies q, k, v. So the largest divisor of S between 3/4 of the balanced length and the balanced
    length is preferred (no padding: the chunks are a view of the sequence); without one, the balanced length.
    """
    balanced = -(-S // -(-S // chunk_size))
    for L in range(balanced, (3 * balanced + 3) // 4 - 1, -1):
        if S % L == 0:
            return L
    return balanced


def get_layout(segment_ids: torch.Tensor | None, S: int, chunk_size: int, device: torch.device) -> ChunkLayout:
    """Cached :func:`build_layout` keyed by (segment boundaries, chunk size, device)."""
    if segment_ids is None:
        key: tuple = ("causal", S, chunk_size, str(device))
        change = None
    else:
        seg = segment_ids.detach().cpu().numpy()
        if seg.ndim == 2 and (seg == seg[:1]).all():
            seg = seg[0]
        change = np.diff(seg, axis=-1) != 0
        key = ("seg", change.shape, np.packbits(change).tobytes(), chunk_size, str(device))
    lay = _LAYOUT_CACHE.get(key)
    if lay is None:
        if change is None:
            # plain causal = segments of length 1
            L = causal_chunk_length(S, chunk_size)
            lay = dataclasses.replace(build_layout(np.ones(S - 1, dtype=bool), L, device), causal=True)
        else:
            lay = build_layout(change, chunk_size, device)
        if len(_LAYOUT_CACHE) >= _LAYOUT_CACHE_MAX:
            _LAYOUT_CACHE.clear()
        _LAYOUT_CACHE[key] = lay
    return lay


def _to_chunks(x: torch.Tensor, lay: ChunkLayout, pad_value: float) -> torch.Tensor:
    """``(B, NH, S, *E)`` -> ``(B, NH, NC, L, *E)`` (E = () or (DH,)), dummy slots filled with pad_value."""
    B, NH, S = x.shape[:3]
    extra = x.shape[3:]
    n = lay.NC * lay.L
    if lay.contiguous:
        pad = (0, 0) * len(extra) + (0, n - S)
        xc = F.pad(x, pad, value=pad_value) if n > S else x
        return xc.reshape(B, NH, lay.NC, lay.L, *extra)
    dummy = torch.full((B, NH, 1, *extra), pad_value, dtype=x.dtype, device=x.device)
    xe = torch.cat([x, dummy], dim=2)
    if lay.idx.dim() == 1:
        xc = xe.index_select(2, lay.idx)
    else:
        index = lay.idx[:, None, :].reshape(B, 1, n, *(1 for _ in extra)).expand(B, NH, n, *extra)
        xc = xe.gather(2, index)
    return xc.reshape(B, NH, lay.NC, lay.L, *extra)


def _from_chunks(h: torch.Tensor, lay: ChunkLayout, S: int) -> torch.Tensor:
    """``(B, NH, NC, L, DH)`` -> ``(B, NH, S, DH)``, dropping dummy slots."""
    B, NH, NC, L, DH = h.shape
    flat = h.reshape(B, NH, NC * L, DH)
    if lay.contiguous:
        return flat[:, :, :S]
    if lay.inv.dim() == 1:
        return flat.index_select(2, lay.inv)
    return flat.gather(2, lay.inv[:, None, :, None].expand(B, NH, S, DH))


def _tile_major(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x: (..., L, DH)`` in ``(..., DH, L)`` contiguous memory, returned as ``(..., L, DH)``."""
    return x.mT.contiguous().mT


def _value_width(DH: int, device: torch.device) -> int:
    """Width of v with its column of ones: ``DH + 1`` on the CPU; on GPUs, whose matmul kernels want widths in
    multiples of 8, padded with zero columns to ``DH + 8``."""
    return DH + (1 if device.type == "cpu" else 8)


def _with_ones(v: torch.Tensor, tiles: bool, extra: int) -> torch.Tensor:
    """``(..., L, DH) -> (..., L, DH + extra)``: ``v``, a column of ones and ``extra - 1`` columns of zeros; in
    :func:`_tile_major` memory if ``tiles``."""
    DH = v.shape[-1]
    shape = (*v.shape[:-2], DH + extra, v.shape[-2]) if tiles else (*v.shape[:-1], DH + extra)
    out = v.new_zeros(shape) if extra > 1 else v.new_empty(shape)
    out = out.mT if tiles else out
    out[..., DH] = 1.0
    out[..., :DH] = v  # recorded by autograd as a copy into a slice
    return out


def _scale_tiles(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``f[..., None] * x`` (``f: (..., L)``, ``x: (..., L, DH)``) in :func:`_tile_major` memory: written there
    directly in one pass, or (where autograd records it, which ``out=`` does not allow) computed in ``x``'s layout and
    moved."""
    if torch.is_grad_enabled() and (f.requires_grad or x.requires_grad):
        return _tile_major(f[..., None] * x)
    shape, dtype = (*x.shape[:-2], x.shape[-1], x.shape[-2]), torch.promote_types(f.dtype, x.dtype)
    return torch.mul(f[..., None], x, out=torch.empty(shape, dtype=dtype, device=x.device).mT)


def mlstm_chunkwise(
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
    """Chunkwise mLSTM (memory O(S * chunk_size + (S / chunk_size) * DH^2) per (batch, head)).

    Args:
        q, k, v: ``(B, NH, S, DH)``.
        igate, fgate: ``(B, NH, S)`` gate pre-activations.
        segment_ids: optional ``(S,)`` or ``(B, S)`` non-decreasing ids (cluster-causal reading).
        chunk_size: maximal tokens per chunk (segments longer than this get a chunk of their own).
        eps: added to the normaliser.
        reverse: scan from the end (token t reads s >= t), without segments. When the chunks tile the sequence
            exactly (no dummy slot), only the small gate tensors are flipped into scan order; the chunk sums and
            the intra-chunk products run on q, k, v in place (upper triangle, states from later chunks).
            Otherwise q, k, v are flipped.

    Returns:
        h: ``(B, NH, S, DH)`` in the dtype of ``q``.
    """
    B, NH, S, DH = q.shape
    dtype = q.dtype
    acc = acc_dtype(dtype)
    lay = get_layout(segment_ids, S, int(chunk_size), q.device)
    NC, L = lay.NC, lay.L
    if reverse:
        if segment_ids is not None:
            raise ValueError("reverse=True takes no segment_ids")
        if NC * L != S:  # dummy slots would lead the scan: flip the sequence instead
            flip = [t.flip(2) for t in (q, k, v, igate, fgate)]
            return mlstm_chunkwise(*flip, chunk_size=chunk_size, eps=eps).flip(2)
    ig, logf = prep_gates(igate, fgate, acc)

    def scan(x: torch.Tensor) -> torch.Tensor:
        """``(..., NC, L)`` between sequence order and scan order (an involution)."""
        return x.flip(-1, -2) if reverse else x

    # ---- gates, stabilisers and chunk weights: small tensors, in scan order ----
    igc = scan(_to_chunks(ig, lay, float("-inf")))  # (B, NH, NC, L)
    lfc = scan(_to_chunks(logf, lay, 0.0))
    b = lfc.cumsum(-1)  # (B, NH, NC, L) local cumulative log forget
    g = b[..., -1]  # (B, NH, NC) chunk totals
    # u_s = igate_s - b_s; U = running max of u inside the chunk (dummy slots: u = -inf, they sit after
    # the real tokens of their chunk). Then max_{s allowed} log D[t, s] = b_r(t) + U_r(t).
    u = igc - b
    U = running_max(u)  # (B, NH, NC, L)
    if lay.rloc is None:
        Fr, Ur = b, U
    else:
        rl = lay.rloc.expand(B, NH, NC, L) if lay.rloc.dim() == 2 else lay.rloc[:, None].expand(B, NH, NC, L)
        Fr, Ur = b.gather(-1, rl), U.gather(-1, rl)

    # Inter-chunk states, all at once. Chunk summary: w_s = g - b_s + igate_s = g + u_s, mloc = max_s w_s =
    # g + U_last. The state at the start of chunk c (c >= 1) is sum_{j < c} exp(A[c, j] - M_c) S_j with
    # A[c, j] = U_last_j + g_j + ... + g_{c-1} and M_c = max_j A[c, j]: the closed form of
    # M_{c+1} = g_c + max(M_c, U_last_c), C_{c+1} = exp(M_c - top) C_c + exp(U_last_c - top) S_c
    # (top = max(M_c, U_last_c)). One small matmul replaces that loop over (DH, DH) states; each sum of g is its
    # own masked sum (no difference of cumulative sums, so no cancellation).
    if NC > 1:
        U_last = U[..., -1]  # (B, NH, NC); -inf only for chunks without real tokens (never chunk 0)
        c_idx = torch.arange(1, NC, device=q.device)[:, None, None]  # state of chunk c
        j_idx = torch.arange(NC, device=q.device)[None, :, None]  # summary of chunk j
        i_idx = torch.arange(NC, device=q.device)[None, None, :]  # forget total of chunk i
        span = ((j_idx <= i_idx) & (i_idx < c_idx)).to(acc)  # (NC-1, NC, NC): i in [j, c)
        A = U_last[..., None, :] + torch.einsum("bhi,cji->bhcj", g, span)  # (B, NH, NC-1, NC)
        A = A.masked_fill((j_idx >= c_idx)[..., 0], float("-inf"))  # only earlier chunks
        M_st = A.amax(-1)  # (B, NH, NC-1); finite: chunk 0 is never empty
        # m_t - b_r(t) = max(M_c, U_r(t)) =: V_t (the inter part has log-scale a_t = b_r(t) + M_c)
        V_rest = torch.maximum(M_st[..., None], Ur[:, :, 1:])  # (B, NH, NC-1, L)
        V = torch.cat([Ur[:, :, :1], V_rest], dim=2)
    else:
        V = Ur
    m = Fr + V  # (B, NH, NC, L): the parallel form's row stabiliser
    # plain causal layout: every chunk starts with a real token (the reference of the rank-1 form)
    factors = decay_factors(u, V) if lay.causal else None

    # ---- q, k, v in sequence order ----
    # Inputs with the tokens innermost ((B, NH, DH, S) memory, as ViL's layer gives them) and chunks that tile the
    # sequence are worked on as (DH, L) tiles: every (B, NH, NC, L, DH) operand of a product is then the transposed
    # view of a contiguous (B, NH, NC, DH, L) tensor, which a batched matmul reads without a copy. Getting there
    # moves runs of L tokens (or is the scaling by a per-token factor itself), where token-major operands would
    # need a transposing copy of q, k and v first. Other inputs are token-major, q and k copied to it where needed (v
    # is copied into its own buffer below in any case).
    tiles = lay.contiguous and NC * L == S and DH > 1 and all(t.mT.is_contiguous() for t in (q, k, v))
    if not tiles:
        q, k = (t.contiguous() if t.mT.is_contiguous() and DH > 1 else t for t in (q, k))
    qc = _to_chunks(q.to(acc), lay, 0.0)  # (B, NH, NC, L, DH), views where no dummy slot is needed
    kc = _to_chunks(k.to(acc), lay, 0.0)  # the 1 / sqrt(DH) scale goes into the (L,)-sized factors
    # v with a column of ones, so that the products with it also give the normaliser's sums (row sums of the
    # decay-weighted scores, the key sums of the states): (B, NH, NC, L, DV), made once, two products read it
    DV = _value_width(DH, v.device)
    vc = _with_ones(_to_chunks(v.to(acc), lay, 0.0), tiles, DV - DH)

    def scaled(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``f[..., None] * x`` for ``(..., L)`` factors and ``(..., L, DH)`` chunks, in the products' layout."""
        return _scale_tiles(f, x) if tiles else f[..., None] * x  # token-major: contiguous (the factor first)

    kscale = 1.0 / math.sqrt(DH)
    # Reversed scans build the transposed matrix (rows s, columns t), so that its masked pairs are the upper
    # triangle: tril_ is 4-6x faster than triu_ on CPU.
    if factors is not None:  # (q k^T) * E = (alpha q)(beta k)^T, no (L, L) exponentials
        alpha, beta = factors
        kb = scaled(scan(beta * kscale), kc)  # (B, NH, NC, L, DH)
        qa = scaled(scan(alpha), qc)
        Ct = kb @ qa.transpose(-1, -2) if reverse else qa @ kb.transpose(-1, -2)  # (B, NH, NC, L, L)
    else:  # masked pairs (and dummy slots) zeroed in the product; the scale as a log offset
        us, Vs = scan(u + math.log(kscale)), scan(V)
        if tiles:
            qc, kc = _tile_major(qc), _tile_major(kc)
        if reverse:
            Ct = (kc @ qc.transpose(-1, -2)) * decay_exp_(us[..., :, None] - Vs[..., None, :])
        else:
            Ct = (qc @ kc.transpose(-1, -2)) * decay_exp_(us[..., None, :] - Vs[..., :, None])
    # tril_ writes only the masked triangle: 10x faster than masked_fill_
    Ct = Ct.tril_() if lay.causal else Ct.masked_fill_(lay.not_allowed, 0.0)  # reverse: causal layout only
    if reverse:
        Ct = Ct.transpose(-1, -2)
    num = Ct @ vc  # (B, NH, NC, L, DV): the numerator, and in column DH the normaliser's sum
    if NC > 1:
        # chunk summaries, every chunk including the last one (unused: slicing it off would copy k and v)
        if factors is not None:  # beta k = exp(ref - U_last) * w k per chunk: that factor goes into W
            kw = kb
            A = A + (u[..., 0].detach() - U_last)[..., None, :]  # the reference is a constant, as in beta
        else:
            wexp = torch.exp(u - finite_or_zero(U_last)[..., None])  # (B, NH, NC, L)
            kw = scaled(scan(wexp * kscale), kc)  # (B, NH, NC, L, DH)
        S_sum = kw.transpose(-1, -2) @ vc  # (B, NH, NC, DH, DV): the summaries, n_sum in column DH
        W = torch.exp(A - M_st[..., None])  # (B, NH, NC-1, NC), <= 1, 0 for later chunks
        if reverse:  # rows: the chunks NC-2..0 in sequence order; columns: the summaries in sequence order
            W = W.flip(-1, -2)
        C_st = (W @ S_sum.flatten(-2)).unflatten(-1, (DH, DV))  # (B, NH, NC-1, DH, DV): states and n_st
        ea = scan(torch.exp(M_st[..., None] - V_rest))  # (B, NH, NC-1, L) = exp(a_t - m_t) <= 1
        rest = slice(0, NC - 1) if reverse else slice(1, NC)  # the chunks that have a state
        num[:, :, rest] += scaled(ea, qc[:, :, rest]) @ C_st
    den = torch.maximum(num[..., DH].abs(), exp_neg(scan(m)))
    h = num[..., :DH] / (den + eps)[..., None]
    return _from_chunks(h, lay, S).to(dtype)
