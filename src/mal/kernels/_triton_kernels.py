"""Triton kernels of the ``"triton"`` mLSTM backend (imported lazily by :mod:`mal.kernels.triton`).

Everything here works on one (batch, head) pair per program and on chunks of ``L`` scan positions. The notation
and the math are in :mod:`mal.kernels.triton`; in short, per chunk ``c`` (scan positions ``c L .. c L + L - 1``):

* ``ul[j]``: key log-weight of slot j in the chunk's own frame (``igate - local cumsum of log f``), ``-inf`` for
  slots past the sequence end;
* ``M[c]``: log-scale of the state at the chunk start (``-inf`` for chunk 0), ``Ve[c]``: log-scale of the state at
  the chunk end, relative to the same frame (``M[c + 1] = Ve[c] + chunk total of log f``);
* ``(C_c, n_c)``: the stabilised state at the chunk start, ``(DH, DH)`` and ``(DH,)``, float32;
* the queries of chunk c are the tokens whose read position ``r(t)`` (end of their segment) lies in the chunk: a
  contiguous range ``[qs[c], qs[c + 1])`` (``[c L, c L + L)`` in the plain causal case). Query t reads the keys
  ``j <= r(t) - c L`` of the chunk plus the state ``C_c``, with the row stabiliser ``V[t]``.

Dots run on operands in ``DOT`` (the input dtype: bf16/fp16 MMAs, or float32 with ``input_precision="ieee"``) and
accumulate in float32. Under ``TRITON_INTERPRET=1`` they run in float32 on the same (rounded) operands, because the
interpreter's ``tl.dot`` gives wrong results on bf16 operands (triton 3.9).

Only core builtins are called (``tl.full``, ``tl.reduce``; not ``tl.zeros`` / ``tl.sum``, which Triton's standard
library defines with ``@triton.jit``): the interpreter can run those only if ``triton`` was first imported with
``TRITON_INTERPRET=1`` set, and ``torch._dynamo`` may import it earlier in a test session.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # the mode ``triton.jit`` built these kernels in (it reads TRITON_INTERPRET when they are decorated)
    from triton import knobs

    INTERPRET = bool(knobs.runtime.interpret)
except (ImportError, AttributeError):  # triton < 3.3 reads the variable directly (as triton.interpret_requested)
    INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")

#: Operand dtype of the dots for each supported input dtype.
DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, axis):
    """``tl.sum`` built from the core ``tl.reduce``: see the module docstring."""
    return tl.reduce(x, axis, _add)


@triton.jit
def _dot(a, b, DOT: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    """``a @ b`` in float32 from operands rounded to ``DOT``."""
    if INTERPRET:
        out = tl.dot(a.to(DOT).to(tl.float32), b.to(DOT).to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a.to(DOT), b.to(DOT), input_precision=PREC)
    return out


@triton.jit
def _seq_pos(t, S, REVERSE: tl.constexpr):
    """Memory position along S of scan position ``t`` (a reversed scan reads the sequence from its end)."""
    return S - 1 - t if REVERSE else t


@triton.jit
def _query_range(qs_ptr, b, s_qs, c, S, L: tl.constexpr, SEGMENTED: tl.constexpr):
    """``[lo, hi)``: the queries that read chunk c."""
    if SEGMENTED:
        lo = tl.load(qs_ptr + b * s_qs + c)
        hi = tl.load(qs_ptr + b * s_qs + c + 1)
    else:
        lo = c * L
        hi = tl.minimum(lo + L, S)
    return lo, hi


@triton.jit
def _read_slot(rd_ptr, b, s_rd, t, tmask, c, L: tl.constexpr, SEGMENTED: tl.constexpr):
    """Local slot ``r(t) - c L`` of the state each query reads (its own slot without segments)."""
    return tl.load(rd_ptr + b * s_rd + t, mask=tmask, other=0) - c * L if SEGMENTED else t - c * L


@triton.jit
def state_fwd_kernel(
    k_ptr, v_ptr, ul_ptr, M_ptr, Ve_ptr, C_ptr, n_ptr,
    s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd,
    S, NC, NH, scale,
    DH: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, L: tl.constexpr,
    REVERSE: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """States at every chunk start: ``C_{c+1} = exp(M_c - Ve_c) C_c + sum_j exp(ul_j - Ve_c) k_j v_j^T``.

    Grid ``(B * NH, BD // BV)``: one program per (batch, head) and block of value columns, looping over chunks.
    Writes ``C: (B * NH, NC, BD, BD)`` and ``n: (B * NH, NC, BD)`` (float32, zero-padded past DH).
    """
    bh = tl.program_id(0).to(tl.int64)
    pv = tl.program_id(1)
    b = bh // NH
    hd = bh % NH
    offs_j = tl.arange(0, L)
    offs_d = tl.arange(0, BD)
    offs_v = pv * BV + tl.arange(0, BV)
    dmask = offs_d < DH
    vmask = offs_v < DH
    k_base = k_ptr + b * s_kb + hd * s_kh
    v_base = v_ptr + b * s_vb + hd * s_vh
    C = tl.full((BD, BV), 0.0, tl.float32)
    n = tl.full((BD,), 0.0, tl.float32)
    for c in range(NC):
        st = bh * NC + c
        tl.store(C_ptr + st * BD * BD + offs_d[:, None] * BD + offs_v[None, :], C)
        if pv == 0:
            tl.store(n_ptr + st * BD + offs_d, n)
        Mc = tl.load(M_ptr + st)
        Vc = tl.load(Ve_ptr + st)
        t = c * L + offs_j
        tmask = t < S
        pos = _seq_pos(t, S, REVERSE)
        kk = tl.load(
            k_base + pos[:, None] * s_ks + offs_d[None, :] * s_kd, mask=tmask[:, None] & dmask[None, :], other=0.0
        ).to(tl.float32)
        vv = tl.load(
            v_base + pos[:, None] * s_vs + offs_v[None, :] * s_vd, mask=tmask[:, None] & vmask[None, :], other=0.0
        )
        e = tl.exp(tl.load(ul_ptr + bh * NC * L + c * L + offs_j) - Vc)  # (L,), 0 past the sequence end
        kw = kk * (e * scale)[:, None]
        f = tl.exp(Mc - Vc)  # 0 for chunk 0 (M = -inf), whose state is zero
        C = C * f + _dot(tl.trans(kw), vv, DOT, PREC, INTERPRET)
        n = n * f + _sum(kw, 0)


@triton.jit
def chunk_fwd_kernel(
    q_ptr, k_ptr, v_ptr, h_ptr, ul_ptr, V_ptr, m_ptr, M_ptr, C_ptr, n_ptr, N_ptr, z_ptr, rd_ptr, qs_ptr,
    s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd, s_hb, s_hh, s_hs, s_hd,
    s_rd, s_qsb,
    S, NC, NH, scale, eps, LIMIT,
    DH: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, L: tl.constexpr, BQ: tl.constexpr,
    SEGMENTED: tl.constexpr, REVERSE: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Outputs of the queries of one chunk: the intra-chunk attention-like part plus the state read.

    Grid ``(B * NH, NC, BD // BV)``. For query t (slot ``jp`` of its read position, row stabiliser ``V_t``)::

        P[t, j] = (q_t . k_j) * scale * exp(ul_j - V_t)    for j <= jp, else 0
        A_t = P v + exp(M_c - V_t) q_t C_c,   z_t = sum_j P[t, j] + exp(M_c - V_t) q_t . n_c
        h_t = A_t / (max(|z_t|, exp(-m_t)) + eps)

    Also writes ``N_t = max(|z_t|, exp(-m_t)) + eps`` and ``z_t`` (float32) for the backward.
    """
    bh = tl.program_id(0).to(tl.int64)  # axis 0: B * NH may exceed the 65535 limit of the other grid axes
    c = tl.program_id(1)
    pv = tl.program_id(2)
    b = bh // NH
    hd = bh % NH
    offs_j = tl.arange(0, L)
    offs_q = tl.arange(0, BQ)
    offs_d = tl.arange(0, BD)
    offs_v = pv * BV + tl.arange(0, BV)
    dmask = offs_d < DH
    vmask = offs_v < DH
    st = bh * NC + c
    # the chunk's keys, values, key log-weights and state
    tk = c * L + offs_j
    kmask = tk < S
    pk = _seq_pos(tk, S, REVERSE)
    kk = tl.load(
        k_ptr + b * s_kb + hd * s_kh + pk[:, None] * s_ks + offs_d[None, :] * s_kd,
        mask=kmask[:, None] & dmask[None, :],
        other=0.0,
    )
    vv = tl.load(
        v_ptr + b * s_vb + hd * s_vh + pk[:, None] * s_vs + offs_v[None, :] * s_vd,
        mask=kmask[:, None] & vmask[None, :],
        other=0.0,
    )
    ul = tl.load(ul_ptr + bh * NC * L + c * L + offs_j)
    Mc = tl.load(M_ptr + st)
    Cs = tl.load(C_ptr + st * BD * BD + offs_d[:, None] * BD + offs_v[None, :])
    ns = tl.load(n_ptr + st * BD + offs_d)
    lo, hi = _query_range(qs_ptr, b, s_qsb, c, S, L, SEGMENTED)
    for t0 in range(lo, hi, BQ):
        t = t0 + offs_q
        tmask = t < hi
        pq = _seq_pos(t, S, REVERSE)
        qq = tl.load(
            q_ptr + b * s_qb + hd * s_qh + pq[:, None] * s_qs + offs_d[None, :] * s_qd,
            mask=tmask[:, None] & dmask[None, :],
            other=0.0,
        )
        Vt = tl.load(V_ptr + bh * S + t, mask=tmask, other=float("inf"))  # weight 0 for padding rows
        mt = tl.load(m_ptr + bh * S + t, mask=tmask, other=0.0)
        jp = _read_slot(rd_ptr, b, s_rd, t, tmask, c, L, SEGMENTED)
        # (BQ, L), <= 1; masked in the exponent, so that no pair overflows
        E = tl.exp(tl.where(offs_j[None, :] <= jp[:, None], ul[None, :] - Vt[:, None], float("-inf")))
        P = _dot(qq, tl.trans(kk), DOT, PREC, INTERPRET) * scale * E
        a = tl.exp(Mc - Vt)  # (BQ,) weight of the state, <= 1 (0 in chunk 0)
        z = _sum(P, 1) + a * _sum(qq.to(tl.float32) * ns[None, :], 1)
        A = _dot(P, vv, DOT, PREC, INTERPRET) + a[:, None] * _dot(qq, Cs, DOT, PREC, INTERPRET)
        N = tl.maximum(tl.abs(z), tl.exp(tl.minimum(-mt, LIMIT))) + eps
        out = A / N[:, None]
        tl.store(
            h_ptr + b * s_hb + hd * s_hh + pq[:, None] * s_hs + offs_v[None, :] * s_hd,
            out.to(h_ptr.dtype.element_ty),
            mask=tmask[:, None] & vmask[None, :],
        )
        if pv == 0:
            tl.store(N_ptr + bh * S + t, N, mask=tmask)
            tl.store(z_ptr + bh * S + t, z, mask=tmask)


@triton.jit
def state_bwd_kernel(
    q_ptr, dh_ptr, V_ptr, N_ptr, dz_ptr, M_ptr, Ve_ptr, C_ptr, n_ptr, dC_ptr, dn_ptr, X_ptr, qs_ptr,
    s_qb, s_qh, s_qs, s_qd, s_db, s_dh, s_ds, s_dd, s_qsb,
    S, NC, NH, NVT,
    DH: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, L: tl.constexpr, BQ: tl.constexpr,
    SEGMENTED: tl.constexpr, REVERSE: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Gradients of the chunk-start states, from the last chunk to the first.

    With ``G_c`` the gradient of the loss w.r.t. the stabilised state ``C_c`` (``gn_c`` for ``n_c``)::

        G_c = exp(M_c - Ve_c) G_{c+1} + sum_{t reads chunk c} exp(M_c - V_t) q_t dA_t^T,   dA_t = dh_t / N_t
        gn_c = exp(M_c - Ve_c) gn_{c+1} + sum_t exp(M_c - V_t) dz_t q_t

    Grid ``(B * NH, BD // BV)``. Writes ``dC[c] = G_{c+1}`` and ``dn[c] = gn_{c+1}`` (the gradient of the state at
    the END of chunk c, which its keys wrote) and ``X[c] = <G_c, C_c> + <gn_c, n_c>`` per block of value columns
    (``dL/dM_c``, since every use of ``C_c`` carries the factor ``exp(M_c)``).
    """
    bh = tl.program_id(0).to(tl.int64)
    pv = tl.program_id(1)
    b = bh // NH
    hd = bh % NH
    offs_q = tl.arange(0, BQ)
    offs_d = tl.arange(0, BD)
    offs_v = pv * BV + tl.arange(0, BV)
    dmask = offs_d < DH
    vmask = offs_v < DH
    G = tl.full((BD, BV), 0.0, tl.float32)
    gn = tl.full((BD,), 0.0, tl.float32)
    for i in range(NC):
        c = NC - 1 - i
        st = bh * NC + c
        tl.store(dC_ptr + st * BD * BD + offs_d[:, None] * BD + offs_v[None, :], G)
        if pv == 0:
            tl.store(dn_ptr + st * BD + offs_d, gn)
        Mc = tl.load(M_ptr + st)
        f = tl.exp(Mc - tl.load(Ve_ptr + st))
        G = G * f
        gn = gn * f
        lo, hi = _query_range(qs_ptr, b, s_qsb, c, S, L, SEGMENTED)
        for t0 in range(lo, hi, BQ):
            t = t0 + offs_q
            tmask = t < hi
            pq = _seq_pos(t, S, REVERSE)
            qq = tl.load(
                q_ptr + b * s_qb + hd * s_qh + pq[:, None] * s_qs + offs_d[None, :] * s_qd,
                mask=tmask[:, None] & dmask[None, :],
                other=0.0,
            ).to(tl.float32)
            dA = tl.load(
                dh_ptr + b * s_db + hd * s_dh + pq[:, None] * s_ds + offs_v[None, :] * s_dd,
                mask=tmask[:, None] & vmask[None, :],
                other=0.0,
            ).to(tl.float32)
            Vt = tl.load(V_ptr + bh * S + t, mask=tmask, other=float("inf"))  # weight 0 for padding rows
            Nt = tl.load(N_ptr + bh * S + t, mask=tmask, other=1.0)
            dzt = tl.load(dz_ptr + bh * S + t, mask=tmask, other=0.0)
            qa = qq * tl.exp(Mc - Vt)[:, None]
            G += _dot(tl.trans(qa), dA / Nt[:, None], DOT, PREC, INTERPRET)
            gn += _sum(qa * dzt[:, None], 0)
        Cs = tl.load(C_ptr + st * BD * BD + offs_d[:, None] * BD + offs_v[None, :])
        X = _sum(_sum(G * Cs, 1), 0)
        if pv == 0:
            X += _sum(gn * tl.load(n_ptr + st * BD + offs_d), 0)
        tl.store(X_ptr + (bh * NVT + pv) * NC + c, X)


@triton.jit
def _bwd_tile(
    q_ptr, dh_ptr, V_ptr, N_ptr, dz_ptr, rd_ptr, kk, vv, ul, t0, hi, b, hd, bh, c,
    s_qb, s_qh, s_qs, s_qd, s_db, s_dh, s_ds, s_dd, s_rd,
    S, scale,
    DH: tl.constexpr, BD: tl.constexpr, L: tl.constexpr, BQ: tl.constexpr,
    SEGMENTED: tl.constexpr, REVERSE: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Recomputes one tile of queries ``[t0, t0 + BQ)`` of a chunk for the backward: returns
    ``(t, tmask, pos, qq, dA, Nt, Vt, dzt, P, dS)`` with ``dA = dh / N``, ``P`` the masked weights of the forward and
    ``dS = (dA v^T + dz) * E`` (the gradient of the unweighted scores ``q . k * scale``)."""
    offs_j = tl.arange(0, L)
    offs_d = tl.arange(0, BD)
    t = t0 + tl.arange(0, BQ)
    tmask = t < hi
    pq = _seq_pos(t, S, REVERSE)
    qdmask = tmask[:, None] & (offs_d < DH)[None, :]
    qq = tl.load(q_ptr + b * s_qb + hd * s_qh + pq[:, None] * s_qs + offs_d[None, :] * s_qd, mask=qdmask, other=0.0)
    dh = tl.load(dh_ptr + b * s_db + hd * s_dh + pq[:, None] * s_ds + offs_d[None, :] * s_dd, mask=qdmask, other=0.0)
    Vt = tl.load(V_ptr + bh * S + t, mask=tmask, other=float("inf"))  # weight 0 for padding rows
    Nt = tl.load(N_ptr + bh * S + t, mask=tmask, other=1.0)
    dzt = tl.load(dz_ptr + bh * S + t, mask=tmask, other=0.0)
    jp = _read_slot(rd_ptr, b, s_rd, t, tmask, c, L, SEGMENTED)
    dA = dh.to(tl.float32) / Nt[:, None]
    E = tl.exp(tl.where(offs_j[None, :] <= jp[:, None], ul[None, :] - Vt[:, None], float("-inf")))
    P = _dot(qq, tl.trans(kk), DOT, PREC, INTERPRET) * scale * E
    dS = (_dot(dA, tl.trans(vv), DOT, PREC, INTERPRET) + dzt[:, None]) * E
    return t, tmask, pq, qq, dA, Nt, Vt, dzt, P, dS


@triton.jit
def chunk_bwd_kernel(
    q_ptr, k_ptr, v_ptr, dh_ptr, dq_ptr, dk_ptr, dv_ptr, ul_ptr, V_ptr, N_ptr, dz_ptr, M_ptr, Ve_ptr,
    C_ptr, n_ptr, dC_ptr, dn_ptr, dul_ptr, dV_ptr, rd_ptr, qs_ptr,
    s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd, s_db, s_dh, s_ds, s_dd,
    s_gqb, s_gqh, s_gqs, s_gqd, s_gkb, s_gkh, s_gks, s_gkd, s_gvb, s_gvh, s_gvs, s_gvd,
    s_rd, s_qsb,
    S, NC, NH, scale,
    DH: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, L: tl.constexpr, BQ: tl.constexpr,
    SEGMENTED: tl.constexpr, REVERSE: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Gradients of k, v (keys of chunk c) and of q (queries of chunk c), and the log-weight gradients.

    Grid ``(B * NH, NC)``; every query and every key belongs to exactly one chunk, so nothing is accumulated
    across programs. With ``dP = dA v^T + dz``, ``dS = dP * E`` (``E`` the masked decay of the forward)::

        dk_j = scale dS^T q + scale exp(ul_j - Ve_c) (G_{c+1} v_j + gn_{c+1})
        dv_j = P^T dA + exp(ul_j - Ve_c) G_{c+1}^T k_j
        dq_t = scale dS k + exp(M_c - V_t) (C_c dA_t + dz_t n_c)

    (``k_j`` scaled in the last term of dv). ``V_t`` and ``ul_j`` enter only as factors ``exp(-V_t)`` of the terms
    linear in ``q_t`` and ``exp(ul_j)`` of those linear in ``k_j``, hence ``dV_t = -q_t . dq_t`` and
    ``dul_j = k_j . dk_j``. Two passes over the chunk's queries, dk/dv first and dq second (as in Triton's fused
    attention tutorial), so that the two sets of accumulators are never live at once.
    """
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    b = bh // NH
    hd = bh % NH
    offs_j = tl.arange(0, L)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < DH
    st = bh * NC + c
    tk = c * L + offs_j
    pk = _seq_pos(tk, S, REVERSE)
    kdmask = (tk < S)[:, None] & dmask[None, :]
    kk = tl.load(k_ptr + b * s_kb + hd * s_kh + pk[:, None] * s_ks + offs_d[None, :] * s_kd, mask=kdmask, other=0.0)
    vv = tl.load(v_ptr + b * s_vb + hd * s_vh + pk[:, None] * s_vs + offs_d[None, :] * s_vd, mask=kdmask, other=0.0)
    ul = tl.load(ul_ptr + bh * NC * L + c * L + offs_j)
    lo, hi = _query_range(qs_ptr, b, s_qsb, c, S, L, SEGMENTED)

    # pass 1: dk, dv of the chunk's keys
    dk = tl.full((L, BD), 0.0, tl.float32)
    dv = tl.full((L, BD), 0.0, tl.float32)
    for t0 in range(lo, hi, BQ):
        t, tmask, pq, qq, dA, Nt, Vt, dzt, P, dS = _bwd_tile(
            q_ptr, dh_ptr, V_ptr, N_ptr, dz_ptr, rd_ptr, kk, vv, ul, t0, hi, b, hd, bh, c,
            s_qb, s_qh, s_qs, s_qd, s_db, s_dh, s_ds, s_dd, s_rd, S, scale,
            DH, BD, L, BQ, SEGMENTED, REVERSE, DOT, PREC, INTERPRET,
        )  # fmt: skip
        dk += _dot(tl.trans(dS), qq, DOT, PREC, INTERPRET) * scale
        dv += _dot(tl.trans(P), dA, DOT, PREC, INTERPRET)
    # what the keys of chunk c wrote into the state at its end
    e = tl.exp(ul - tl.load(Ve_ptr + st))  # (L,)
    G = tl.load(dC_ptr + st * BD * BD + offs_d[:, None] * BD + offs_d[None, :])
    gn = tl.load(dn_ptr + st * BD + offs_d)
    dk += (e * scale)[:, None] * (_dot(vv, tl.trans(G), DOT, PREC, INTERPRET) + gn[None, :])
    dv += e[:, None] * _dot(kk.to(tl.float32) * scale, G, DOT, PREC, INTERPRET)
    tl.store(dul_ptr + bh * NC * L + c * L + offs_j, _sum(kk.to(tl.float32) * dk, 1))
    tl.store(
        dk_ptr + b * s_gkb + hd * s_gkh + pk[:, None] * s_gks + offs_d[None, :] * s_gkd,
        dk.to(dk_ptr.dtype.element_ty),
        mask=kdmask,
    )
    tl.store(
        dv_ptr + b * s_gvb + hd * s_gvh + pk[:, None] * s_gvs + offs_d[None, :] * s_gvd,
        dv.to(dv_ptr.dtype.element_ty),
        mask=kdmask,
    )

    # pass 2: dq of the chunk's queries
    Mc = tl.load(M_ptr + st)
    ns = tl.load(n_ptr + st * BD + offs_d)
    for t0 in range(lo, hi, BQ):
        t, tmask, pq, qq, dA, Nt, Vt, dzt, P, dS = _bwd_tile(
            q_ptr, dh_ptr, V_ptr, N_ptr, dz_ptr, rd_ptr, kk, vv, ul, t0, hi, b, hd, bh, c,
            s_qb, s_qh, s_qs, s_qd, s_db, s_dh, s_ds, s_dd, s_rd, S, scale,
            DH, BD, L, BQ, SEGMENTED, REVERSE, DOT, PREC, INTERPRET,
        )  # fmt: skip
        a = tl.exp(Mc - Vt)
        dq = _dot(dS, kk, DOT, PREC, INTERPRET) * scale + (a * dzt)[:, None] * ns[None, :]
        # the state read, C_c dA_t, by blocks of value columns (bounded registers for DH = 128)
        for iv in tl.static_range(BD // BV):
            offs_v = iv * BV + tl.arange(0, BV)
            dAv = (
                tl.load(
                    dh_ptr + b * s_db + hd * s_dh + pq[:, None] * s_ds + offs_v[None, :] * s_dd,
                    mask=tmask[:, None] & (offs_v < DH)[None, :],
                    other=0.0,
                ).to(tl.float32)
                / Nt[:, None]
            )
            Cs = tl.load(C_ptr + st * BD * BD + offs_d[:, None] * BD + offs_v[None, :])
            dq += a[:, None] * _dot(dAv, tl.trans(Cs), DOT, PREC, INTERPRET)
        tl.store(dV_ptr + bh * S + t, -_sum(qq.to(tl.float32) * dq, 1), mask=tmask)
        tl.store(
            dq_ptr + b * s_gqb + hd * s_gqh + pq[:, None] * s_gqs + offs_d[None, :] * s_gqd,
            dq.to(dq_ptr.dtype.element_ty),
            mask=tmask[:, None] & dmask[None, :],
        )
