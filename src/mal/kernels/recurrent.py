"""Recurrent (step-by-step) stabilised mLSTM: the reference form, O(S) Python steps.

Per batch element and head, with ``k <- k / sqrt(DH)``, ``log f = logsigmoid(fgate)``, ``m_0 = -inf``::

    m_t  = max(log f_t + m_{t-1}, igate_t)
    f'_t = exp(log f_t + m_{t-1} - m_t),  i'_t = exp(igate_t - m_t)
    C_t  = f'_t C_{t-1} + i'_t k_t v_t^T              (stored as (DH_k, DH_v))
    n_t  = f'_t n_{t-1} + i'_t k_t

Query t reads the state at ``r(t)`` (the end of its segment; ``r(t) = t`` without segments)::

    h_t = (q_t C_{r(t)}) / (max(|q_t . n_{r(t)}|, exp(-m_{r(t)})) + eps)

``m_t`` equals ``max_s (F_t - F_s + igate_s)`` exactly, so this backend shares its stabiliser with the
parallel and chunkwise forms and agrees with them to round-off. Only the current state is kept; outputs
are emitted at each segment end for all queries of that segment.
"""

from __future__ import annotations

import math

import torch

from ._utils import acc_dtype, exp_neg, prep_gates, segment_sizes


def _run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ig: torch.Tensor,
    logf: torch.Tensor,
    sizes: tuple[int, ...] | None,
    eps: float,
) -> torch.Tensor:
    """Core loop. q, k, v: ``(B, NH, S, DH)`` (k already scaled); ig, logf: ``(B, NH, S)``;
    ``sizes``: consecutive segment sizes summing to S, or None for plain causal. Returns ``(B, NH, S, DH)``."""
    B, NH, S, DH = q.shape
    ends: set[int]
    if sizes is None:
        ends = set(range(S))
    else:
        ends, pos = set(), 0
        for size in sizes:
            pos += size
            ends.add(pos - 1)

    outs: list[torch.Tensor] = []
    C = n = m = None
    start = 0
    for t in range(S):
        k_t, v_t = k[:, :, t], v[:, :, t]  # (B, NH, DH)
        i_t, lf_t = ig[:, :, t, None], logf[:, :, t, None]  # (B, NH, 1)
        kv = k_t[..., :, None] * v_t[..., None, :]  # (B, NH, DH, DH)
        if m is None:  # t == 0: m_0 = -inf, so m_1 = igate_1 and i' = 1
            m, C, n = i_t, kv, k_t
        else:
            m_new = torch.maximum(lf_t + m, i_t)
            fp = torch.exp(lf_t + m - m_new)
            ip = torch.exp(i_t - m_new)
            C = fp[..., None] * C + ip[..., None] * kv
            n = fp * n + ip * k_t
            m = m_new
        if t in ends:
            Q = q[:, :, start : t + 1]  # (B, NH, L, DH)
            num = Q @ C  # (B, NH, L, DH)
            den = torch.maximum((Q @ n[..., None]).abs(), exp_neg(m)[..., None])  # (B, NH, L, 1)
            outs.append(num / (den + eps))
            start = t + 1
    return torch.cat(outs, dim=2)


def mlstm_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    igate: torch.Tensor,
    fgate: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Recurrent mLSTM (reference; slow, one Python step per token).

    Args:
        q, k, v: ``(B, NH, S, DH)``.
        igate, fgate: ``(B, NH, S)`` gate pre-activations.
        segment_ids: optional ``(S,)`` or ``(B, S)`` non-decreasing ids. With ``(B, S)`` ids that differ
            between samples, each sample is run on its own.
        chunk_size: ignored (uniform backend signature).
        eps: added to the normaliser.

    Returns:
        h: ``(B, NH, S, DH)`` in the dtype of ``q``.
    """
    del chunk_size
    B, NH, S, DH = q.shape
    dtype = q.dtype
    acc = acc_dtype(dtype)
    ig, logf = prep_gates(igate, fgate, acc)
    qa, ka, va = q.to(acc), (k.to(acc) / math.sqrt(DH)), v.to(acc)

    if segment_ids is None:
        return _run(qa, ka, va, ig, logf, None, eps).to(dtype)
    seg = segment_ids
    if seg.dim() == 2 and not bool((seg == seg[:1]).all()):
        outs = [
            _run(qa[b : b + 1], ka[b : b + 1], va[b : b + 1], ig[b : b + 1], logf[b : b + 1],
                 segment_sizes(seg[b]), eps)
            for b in range(B)
        ]  # fmt: skip
        return torch.cat(outs, dim=0).to(dtype)
    row = seg if seg.dim() == 1 else seg[0]
    return _run(qa, ka, va, ig, logf, segment_sizes(row), eps).to(dtype)
