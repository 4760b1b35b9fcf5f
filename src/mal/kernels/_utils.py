"""Small helpers shared by the mLSTM backends (gate preprocessing, segment bookkeeping).

Shape conventions used throughout ``mal.kernels``:

* ``B``: batch, ``NH``: heads, ``S``: sequence length, ``DH``: head dimension.
* ``q, k, v``: ``(B, NH, S, DH)``; ``igate, fgate``: ``(B, NH, S)`` gate pre-activations.
* ``segment_ids``: ``None``, ``(S,)`` (shared by the batch) or ``(B, S)`` (per sample), non-decreasing along S.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype used for gate cumsums / stabilisers (and state accumulation): float32 for half types."""
    return torch.float32 if dtype in _HALF else dtype


def prep_gates(igate: torch.Tensor, fgate: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(ig, logf)`` in ``dtype``: the input-gate pre-activation and ``logsigmoid(fgate)``.

    Shapes: ``(B, NH, S)`` in, ``(B, NH, S)`` out, contiguous (the gates often arrive as transposed views; the
    ``(..., S, 1)`` factors computed from them then give the ``(..., S, DH)`` products a contiguous layout).
    """
    return igate.to(dtype).contiguous(), F.logsigmoid(fgate.to(dtype).contiguous())


def exp_neg(m: torch.Tensor) -> torch.Tensor:
    """``exp(-m)`` with the exponent clamped below the dtype's overflow point.

    ``exp(-m)`` is the lower bound of the normaliser. It would only overflow for absurd stabilisers
    (``m < -88`` in float32); clamping keeps forward and backward finite there (an ``inf`` in the forward
    turns into ``0 * inf = NaN`` in the backward). All backends use this same helper so they agree.
    """
    limit = math.log(torch.finfo(m.dtype).max) - 2.0
    return torch.exp(torch.clamp(-m, max=limit))


def decay_exp_(logd: torch.Tensor) -> torch.Tensor:
    """``exp(logd)`` in place, for the stabilised log-decay matrices ``(..., S, S)`` of the parallel forms.

    An allowed pair has ``logd <= 0`` (the stabiliser is the row maximum); a masked pair can hold any value, and
    its product with this is zeroed by the caller (``(qk * E).masked_fill_(not_allowed, 0)``), which keeps it
    exactly 0, gradients included. The exponent is clamped to ``[log(tiny) + 1, 0]`` (-86.3 in float32, -707 in
    float64) rather than set to ``-inf`` at the masked pairs: ATen's vectorised ``exp`` leaves its fast path for
    inputs under ``log(tiny)``, ``-inf`` included, and runs 7-70x slower on them (2 cores, float32), and half of
    a causal matrix is masked. The upper bound keeps a masked pair finite, so that its zero gradient is not
    ``0 * inf``. An allowed pair below the clamp gets ``exp(log(tiny) + 1)`` (3e-38 in float32) instead of a
    smaller number; its row also holds a term ``exp(0) = 1``, so the sums do not change.

    The clamp is hidden from autograd (one pass less in the backward): the gradient is ``grad * E`` everywhere,
    which differs from the exact one only at masked pairs (where ``grad`` is 0) and below the clamp (3e-38).
    Measured on the (8, 4, 196, 196) matrix of ViL-T at 2 threads, against ``masked_fill_(-inf).exp_()``:
    forward 2.7 vs 5.9 ms, forward + backward 9.9 vs 12.3 ms.
    """
    with torch.no_grad():
        logd.clamp_(min=math.log(torch.finfo(logd.dtype).tiny) + 1.0, max=0.0)
    return logd.exp_()


#: Largest spread ``max(u) - min(u)`` of the log-decay terms for which :func:`decay_factors` factorises, as a
#: fraction of ``log(finfo.max)`` of the dtype (44 in float32, 354 in float64). Set to 0 to turn it off.
FACTOR_MAX_SPREAD = 0.5


def decay_factors(u: torch.Tensor, Ur: torch.Tensor, *, first: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rank-1 form of a stabilised decay matrix ``E[t, s] = exp(u_s - Ur_t)`` of the parallel forms, or None.

    With the reference ``u_0`` of the scan's first token: ``E[t, s] = exp(u_0 - Ur_t) * exp(u_s - u_0) =
    alpha_t * beta_s``, so ``(q k^T) * E = (alpha q)(beta k)^T``: two ``(..., S, DH)`` scalings replace the
    subtraction, ``exp`` and product over ``(..., S, S)`` (the parallel kernel's forward is about 2.5x faster at
    ViL-T's shape). The reference is the first token because every output may read it: a later token does not
    change the round-off of an earlier output, so the no-leak tests stay exact.

    Exact up to round-off while nothing overflows or loses precision. The stabiliser ``Ur_t`` is at least
    ``u_0`` (a running maximum of ``u``, or larger), so ``alpha_t <= 1``; with ``spread = max(u) - min(u)``
    over the finite entries, ``exp(-spread) <= beta_s <= exp(spread)``. So the form is used only when the
    spread is at most ``FACTOR_MAX_SPREAD * log(finfo.max)`` (44 in float32): ``beta`` is a normal number with
    full relative precision, and the masked products stay below ``1e19 |q.k|``. ``alpha_t`` is at least
    ``exp(-spread)`` when ``Ur_t`` is a running maximum of ``u``; a larger stabiliser (the chunkwise form's
    inter-chunk one) may make it underflow, but then every pair of that row weighs less than
    ``tiny * exp(spread)`` (below 1e-18 in float32) against the term of weight 1 that the stabiliser stands
    for. Longer memories (strong forget gates over long sequences) return None, and the caller takes the
    direct form. An earlier output depends on later tokens only through that choice between two forms that
    agree to round-off. The check is a host sync, so only CPU tensors factorise, and not under ``torch.compile``.
    ``u`` must be float32 or float64 (the kernels keep their gates in float32 for half inputs, so ``alpha q`` and
    ``beta k`` are promoted to float32 and cannot overflow).

    Args:
        u: ``(..., S)`` log-decay terms ``igate_s - F_s``; ``-inf`` marks padding (``beta = 0``). The first entry
            of every row must be finite.
        Ur: ``(..., S)`` row stabilisers, each at least ``u[..., first]``.
        first: index of the scan's first token (``S - 1`` for a reversed scan).

    Returns:
        ``(alpha, beta)``, both ``(..., S)`` and contiguous, or None.
    """
    if u.device.type != "cpu" or u.dtype not in (torch.float32, torch.float64) or FACTOR_MAX_SPREAD <= 0:
        return None
    if torch.compiler.is_compiling():  # no host sync inside a graph; inductor fuses the direct form instead
        return None
    with torch.no_grad():
        lo = u.nan_to_num(neginf=math.inf).amin(-1)  # padding ignored
        spread = float((u.amax(-1) - lo).max())
    if not spread <= FACTOR_MAX_SPREAD * math.log(torch.finfo(u.dtype).max):  # NaN fails too
        return None
    ref = u[..., first : first + 1].detach()
    # contiguous (gates arrive as transposed views): the (..., S, 1) factors then set the layout of the products
    return torch.exp(ref - Ur).contiguous(), torch.exp(u - ref).contiguous()


def running_max(u: torch.Tensor) -> torch.Tensor:
    """``cummax(u, -1).values``, ``(..., S) -> (..., S)``. When exporting (``torch.export``, ONNX), the same values
    as a masked maximum over ``(S, S)``: ONNX has no cumulative maximum."""
    if not (torch.compiler.is_exporting() or torch.jit.is_tracing()):
        return torch.cummax(u, dim=-1).values
    S = u.shape[-1]
    later = torch.ones(S, S, dtype=torch.bool, device=u.device).triu(1)  # [t, s]: s > t
    return u[..., None, :].masked_fill(later, float("-inf")).amax(-1)


def finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """Replaces ``-inf`` (rows with nothing to attend, i.e. padding) by 0, keeping gradients elsewhere."""
    return torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))


def segment_ends(seg: torch.Tensor) -> torch.Tensor:
    """``r(t)``: index of the last position of t's segment. ``seg``: ``(S,)`` or ``(B, S)``, non-decreasing.

    Returns a LongTensor of the same shape as ``seg``.
    """
    seg = seg.contiguous()
    return torch.searchsorted(seg, seg, right=True) - 1


def segment_sizes(seg_row: torch.Tensor) -> tuple[int, ...]:
    """Sizes of consecutive runs in a 1-D non-decreasing id tensor ``(S,)`` (host sync)."""
    _, counts = torch.unique_consecutive(seg_row, return_counts=True)
    return tuple(int(c) for c in counts.tolist())
