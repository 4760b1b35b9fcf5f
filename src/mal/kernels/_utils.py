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

    Shapes: ``(B, NH, S)`` in, ``(B, NH, S)`` out.
    """
    return igate.to(dtype), F.logsigmoid(fgate.to(dtype))


def exp_neg(m: torch.Tensor) -> torch.Tensor:
    """``exp(-m)`` with the exponent clamped below the dtype's overflow point.

    ``exp(-m)`` is the lower bound of the normaliser. It would only overflow for absurd stabilisers
    (``m < -88`` in float32); clamping keeps forward and backward finite there (an ``inf`` in the forward
    turns into ``0 * inf = NaN`` in the backward). All backends use this same helper so they agree.
    """
    limit = math.log(torch.finfo(m.dtype).max) - 2.0
    return torch.exp(torch.clamp(-m, max=limit))


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
