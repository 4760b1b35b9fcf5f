"""Optional adapter to NX-AI's fused Triton mLSTM kernels (the ``mlstm_kernels`` package).

The package is never imported at module import time: :func:`is_available` tries the import only once, only
when CUDA is present, and :func:`mlstm_kernels_chunkwise` imports it lazily when called with CUDA tensors.
Nothing in ``mal`` requires it.

Interface used (``mlstm_kernels`` >= 2.0, checked against the 2.0.6 wheel)::

    from mlstm_kernels.torch import get_mlstm_kernel
    fn = get_mlstm_kernel("chunkwise--triton_xl_chunk")
    h = fn(q, k, v, i, f, return_last_states=False, eps=..., chunk_size=..., autocast_kernel_dtype=...)

with ``q, k, v: (B, NH, S, DH)``, ``i, f: (B, NH, S)`` gate pre-activations. The kernel scales ``q . k`` by
``DH ** -0.5`` itself (so ``k`` is passed unscaled), and it needs ``S`` in {16, 32, 64} or a multiple of its
chunk size (128 here) and a power-of-two-friendly head dimension; this adapter pads the sequence with
tokens that change nothing (forget pre-activation +25, input pre-activation -25, zero q/k/v) and crops, and
zero-pads the head dimension to the next power of two (e.g. 96 -> 128), multiplying q by
``sqrt(DH_pad / DH)`` so the internal scale stays ``1 / sqrt(DH)``, then crops the output.

Numerics: the kernel uses the same stabilised form and adds ``eps`` to the normaliser like the pure-PyTorch
backends, but it works in its kernel dtype with its own tiling, and its backward treats the
stabiliser/normaliser with its own (stop-gradient style) conventions. Exact agreement with the
``parallel`` / ``chunkwise`` backends is therefore not expected: about 1e-3 relative in bf16 (tighter in
float32) for the forward pass; gradients agree only approximately. Only the plain causal case is supported
(no ``segment_ids``); float64 inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

KERNEL_NAME = "chunkwise--triton_xl_chunk"
_KERNEL_CHUNK = 128  # the xl_chunk kernel's default (and fastest) chunk size
_PAD_FGATE = 25.0  # sigmoid(25) ~ 1: padded tokens keep the state
_PAD_IGATE = -25.0  # exp(-25) ~ 0: padded tokens write nothing

_available: bool | None = None
_kernel: Callable | None = None


def _load_kernel() -> Callable:
    """Imports ``mlstm_kernels`` (lazily) and returns its chunkwise Triton XL-chunk kernel."""
    global _kernel
    if _kernel is None:
        try:
            from mlstm_kernels.torch import get_mlstm_kernel

            _kernel = get_mlstm_kernel(KERNEL_NAME)
        except (ImportError, AttributeError, ValueError):
            from mlstm_kernels.torch.chunkwise import mlstm_chunkwise__xl_chunk

            _kernel = mlstm_chunkwise__xl_chunk
    return _kernel


def is_available() -> bool:
    """True if CUDA is present and ``mlstm_kernels`` (with Triton) imports. Cached; never raises."""
    global _available
    if _available is None:
        _available = False
        if torch.cuda.is_available():
            try:
                _load_kernel()
                _available = True
            except Exception:  # any import problem (no triton, old torch, ...) means "not available"
                _available = False
    return _available


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def padded_lengths(S: int, DH: int) -> tuple[int, int]:
    """Sequence length and head dimension the kernel is called with (``S_pad >= S``, ``DH_pad >= DH``)."""
    S_pad = _next_pow2(max(S, 16)) if S <= 64 else -(-S // _KERNEL_CHUNK) * _KERNEL_CHUNK
    DH_pad = DH if (DH >= 16 and _next_pow2(DH) == DH) else _next_pow2(max(DH, 16))
    return S_pad, DH_pad


def mlstm_kernels_chunkwise(
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
    """mLSTM through ``mlstm_kernels``' chunkwise Triton kernel (CUDA only, plain causal only).

    Args:
        q, k, v: ``(B, NH, S, DH)`` CUDA tensors.
        igate, fgate: ``(B, NH, S)`` gate pre-activations.
        segment_ids: must be None (the fused kernel has no cluster-causal mode).
        chunk_size: ignored; the kernel runs with its own chunk size (128, or S_pad for S <= 64).
        eps: added to the normaliser (same convention as the pure-PyTorch backends).

    Returns:
        h: ``(B, NH, S, DH)`` in the dtype of ``q``.
    """
    del chunk_size
    if segment_ids is not None:
        raise ValueError("backend 'mlstm_kernels' supports only the plain causal case (segment_ids=None)")
    if not q.is_cuda:
        raise ValueError(f"backend 'mlstm_kernels' needs CUDA tensors, got device {q.device}")
    kernel = _load_kernel()
    B, NH, S, DH = q.shape
    dtype = q.dtype
    kdtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    S_pad, DH_pad = padded_lengths(S, DH)

    q = q.to(kdtype)
    if DH_pad != DH:
        q = q * math.sqrt(DH_pad / DH)  # kernel scales by DH_pad**-0.5; net scale 1/sqrt(DH)
    qkv_pad = (0, DH_pad - DH, 0, S_pad - S)
    q = F.pad(q, qkv_pad)
    k = F.pad(k.to(kdtype), qkv_pad)
    v = F.pad(v.to(kdtype), qkv_pad)
    i = F.pad(igate.float(), (0, S_pad - S), value=_PAD_IGATE)
    f = F.pad(fgate.float(), (0, S_pad - S), value=_PAD_FGATE)

    kwargs: dict = {"return_last_states": False, "eps": eps, "autocast_kernel_dtype": kdtype}
    params = inspect.signature(kernel).parameters
    if "chunk_size" in params:
        kwargs["chunk_size"] = _KERNEL_CHUNK
    kwargs = {key: val for key, val in kwargs.items() if key in params}
    h = kernel(q.contiguous(), k.contiguous(), v.contiguous(), i.contiguous(), f.contiguous(), **kwargs)
    if isinstance(h, tuple):  # some versions always return (h, last_states)
        h = h[0]
    return h[:, :, :S, :DH].to(dtype)
