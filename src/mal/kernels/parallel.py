"""Parallel (quadratic, attention-like) stabilised mLSTM.

This is the Vision-LSTM / xLSTM parallel form. Per batch element and head, with ``k <- k / sqrt(DH)``,
``F = cumsum(logsigmoid(fgate))`` and ``r(t)`` the last position of t's segment (``r(t) = t`` without
segments)::

    log D[t, s] = F[r(t)] - F[s] + igate[s]    if seg(s) <= seg(t) else -inf (a masked pair)
    m[t]        = max_s log D[t, s]
    C[t, s]     = (q[t] . k[s]) * exp(log D[t, s] - m[t])
    n[t]        = max(|sum_s C[t, s]|, exp(-m[t]))
    h[t]        = sum_s C[t, s] v[s] / (n[t] + eps)

Memory is O(S^2) per (batch, head); it is the fastest pure-PyTorch form for short sequences. On CPU the decay
factor ``exp(log D[t, s] - m[t])`` is used in its rank-1 form ``alpha[t] * beta[s]`` where the gates allow it
(``mal.kernels._utils.decay_factors``), so that C is one product of scaled queries and keys.
"""

from __future__ import annotations

import math

import torch

from ._utils import acc_dtype, decay_exp_, decay_factors, exp_neg, prep_gates, running_max, segment_ends


def mlstm_parallel(
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
    """Parallel mLSTM.

    Args:
        q, k, v: ``(B, NH, S, DH)``.
        igate, fgate: ``(B, NH, S)`` gate pre-activations.
        segment_ids: optional ``(S,)`` or ``(B, S)`` non-decreasing LongTensor (cluster-causal reading:
            every token reads the memory at the end of its own segment). Validated by ``mal.kernels.mlstm``.
        chunk_size: ignored (kept for a uniform backend signature).
        eps: added to the normaliser.
        reverse: scan from the end (token t reads s >= t), without segments: the causal form of the flipped
            sequence, computed in the original order, so that only the ``(B, NH, S)`` gates are flipped.

    Returns:
        h: ``(B, NH, S, DH)`` in the dtype of ``q``.
    """
    del chunk_size
    B, NH, S, DH = q.shape
    dtype = q.dtype
    acc = acc_dtype(dtype)
    ig, logf = prep_gates(igate, fgate, acc)
    if reverse:
        if segment_ids is not None:
            raise ValueError("reverse=True takes no segment_ids")
        ig, logf = ig.flip(-1), logf.flip(-1)
    Fc = logf.cumsum(-1)  # (B, NH, S)

    # Row stabiliser without an (S, S) reduction: with u_s = igate_s - F_s,
    #   m_t = max_{s allowed} (F_r(t) - F_s + igate_s) = F_r(t) + U_r(t),   U = cummax(u)
    # and log D[t, s] - m_t = u_s - U_r(t).
    u = ig - Fc  # (B, NH, S)
    U = running_max(u)
    if segment_ids is None:
        not_allowed = None  # causal: the masked pairs are the upper triangle
        Fr, Ur = Fc, U
    else:
        seg = segment_ids.to(q.device)
        r = segment_ends(seg)
        if seg.dim() == 1:
            not_allowed = seg[None, :] > seg[:, None]  # (S, S): [t, s] = seg(s) > seg(t)
            Fr, Ur = Fc.index_select(-1, r), U.index_select(-1, r)
        else:
            not_allowed = (seg[:, None, :] > seg[:, :, None])[:, None]  # (B, 1, S, S)
            rr = r[:, None, :].expand(B, NH, S)
            Fr, Ur = Fc.gather(-1, rr), U.gather(-1, rr)
    m = Fr + Ur  # (B, NH, S); finite: the pair (t, t) is always allowed
    if reverse:  # back to the original order: E[t, s] = exp(u_s - U_t) for s >= t
        u, Ur, m = u.flip(-1), Ur.flip(-1), m.flip(-1)

    factors = decay_factors(u, Ur, first=S - 1 if reverse else 0)
    # Reversed scans build the transposed matrix D = C^T (rows s, columns t): its masked pairs are then the upper
    # triangle, and tril_ is 4-6x faster than triu_ on CPU (it writes row tails instead of row heads).
    if factors is not None:  # (q k^T) * E = (alpha q)(beta k)^T, no (S, S) exponentials
        alpha, beta = factors
        # the (B, NH, S, 1) factor first: the products come out contiguous even when q, k are transposed views,
        # so the bmm reads them without a copy
        qs = (alpha / math.sqrt(DH))[..., None] * q
        kb = beta[..., None] * k
        Ct = kb @ qs.transpose(-1, -2) if reverse else qs @ kb.transpose(-1, -2)  # (B, NH, S, S)
    elif reverse:  # exp(log D - m), transposed: E^T[s, t] = exp(u_s - Ur_t)
        E = decay_exp_(u[..., :, None] - Ur[..., None, :])
        Ct = ((k / math.sqrt(DH)) @ q.transpose(-1, -2)).to(acc) * E
    else:  # exp(log D - m): (B, NH, S, S), built by broadcasting; the masked pairs are zeroed in the product
        E = decay_exp_(u[..., None, :] - Ur[..., :, None])
        Ct = (q @ (k / math.sqrt(DH)).transpose(-1, -2)).to(acc) * E
    # tril_ writes only the masked triangle: 10x faster than masked_fill_ with an (S, S) mask
    Ct = Ct.masked_fill_(not_allowed, 0.0) if not_allowed is not None else Ct.tril_()
    n = torch.maximum(Ct.sum(-2 if reverse else -1).abs(), exp_neg(m))  # (B, NH, S)
    if reverse:
        Ct = Ct.transpose(-1, -2)  # the bmm reads it transposed, without a copy
    h = (Ct.to(dtype) @ v).to(acc) / (n + eps)[..., None]  # divide the (S, DH) result, not (S, S)
    return h.to(dtype)
