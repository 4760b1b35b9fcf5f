"""mLSTM cell (matrix memory, exponential gating) with interchangeable backends.

Backends (all share one stabiliser, so they agree to round-off):

* ``"parallel"``: quadratic attention-like form, fastest for short sequences (``S <= PARALLEL_MAX_LEN``).
* ``"chunkwise"``: linear memory in S; chunks aligned to segments in the segmented case.
* ``"recurrent"``: step-by-step reference (slow).
* ``"triton"``: our fused chunkwise kernel (``mal.kernels.triton``), forward and backward, causal, segmented and
  reversed; registered where the ``triton`` package is installed (imported on first use); CUDA tensors only
  (CPU tensors in Triton's interpreter, ``TRITON_INTERPRET=1``, for tests). "auto" picks it on CUDA.
* ``"mlstm_kernels"``: NX-AI's fused Triton kernel; registered only on CUDA machines where the optional
  ``mlstm_kernels`` package imports; plain causal only.

Shapes: ``q, k, v``: ``(B, NH, S, DH)``; ``igate, fgate``: ``(B, NH, S)`` pre-activations;
``segment_ids``: ``(S,)`` or ``(B, S)`` non-decreasing integer ids; output ``h``: ``(B, NH, S, DH)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import cuda as _cuda
from . import triton as _triton
from .chunkwise import mlstm_chunkwise
from .parallel import mlstm_parallel
from .recurrent import mlstm_recurrent

__all__ = [
    "BACKENDS",
    "PARALLEL_MAX_LEN",
    "PARALLEL_MAX_LEN_CUDA",
    "TRITON_AUTO_MAX_HEAD_DIM",
    "list_backends",
    "mlstm",
    "mlstm_chunkwise",
    "mlstm_parallel",
    "mlstm_recurrent",
    "resolve_backend",
]

#: ``backend="auto"`` uses "parallel" up to this length and "chunkwise" above (CPU / segmented / no
#: mlstm_kernels). From benchmarks/kernel_speed.py on a 2-core CPU (B=2, NH=4, DH=96, float32):
#: parallel is faster at S=196 (fwd 1.4 vs 1.6 ms, fwd+bwd 3.6 vs 4.7 ms), chunkwise at S=256
#: (fwd 1.6 vs 2.1 ms, fwd+bwd 5.2 vs 5.6 ms); they are within noise of each other for S in 208..240.
PARALLEL_MAX_LEN = 224

#: Same threshold for CUDA tensors when "mlstm_kernels" is not used (segmented input, or package missing).
#: Measured on one H100 (B=64, NH=4, DH=96, bf16, forward+backward): parallel 2.4 / 6.1 / 16.7 ms vs
#: chunkwise 7.0 / 10.0 / 14.3 ms at S = 196 / 576 / 1024 (segmented: 2.5 / 6.3 / 17.1 vs 7.8 / 8.8 / 18.5).
PARALLEL_MAX_LEN_CUDA = 768

#: Largest head dimension for which ``backend="auto"`` picks "triton" on CUDA. Its programs hold ``(DH, DH)`` state
#: tiles padded to a power of two: 128 is ViL-T's 96 padded; ViL-S (192) and ViL-B (384) heads take the fallbacks.
TRITON_AUTO_MAX_HEAD_DIM = 128

#: Backend registry: name -> function(q, k, v, igate, fgate, *, segment_ids, chunk_size, eps) -> h.
BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "parallel": mlstm_parallel,
    "chunkwise": mlstm_chunkwise,
    "recurrent": mlstm_recurrent,
}

_optional_checked = False


def _register_optional() -> None:
    """Adds "triton" to BACKENDS once if the package is installed (not imported here), and "mlstm_kernels" if CUDA
    is present and the package imports."""
    global _optional_checked
    if not _optional_checked:
        _optional_checked = True
        if _triton.is_installed():
            BACKENDS["triton"] = _triton.mlstm_triton
        if _cuda.is_available():
            BACKENDS["mlstm_kernels"] = _cuda.mlstm_kernels_chunkwise


def list_backends() -> list[str]:
    """Names of the registered backends (without "auto")."""
    _register_optional()
    return list(BACKENDS)


def resolve_backend(
    name: str, seq_len: int, device: torch.device | str, segmented: bool, head_dim: int | None = None
) -> str:
    """Maps a backend name (or "auto") to a registered backend name.

    "auto" on CUDA: "triton" when registered, its kernels import and ``head_dim`` (if given) is at most
    ``TRITON_AUTO_MAX_HEAD_DIM`` (causal and segmented), else "mlstm_kernels" when registered and not segmented;
    otherwise (and on the CPU, which never picks "triton") "parallel" if ``seq_len <= PARALLEL_MAX_LEN``
    (``PARALLEL_MAX_LEN_CUDA`` for CUDA devices) else "chunkwise".
    Raises ValueError for unknown or unusable names ("triton" on the CPU outside Triton's interpreter).
    """
    _register_optional()
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            fits = head_dim is None or head_dim <= TRITON_AUTO_MAX_HEAD_DIM
            if fits and "triton" in BACKENDS and _triton.is_available():
                return "triton"
            if not segmented and "mlstm_kernels" in BACKENDS:
                return "mlstm_kernels"
            return "parallel" if seq_len <= PARALLEL_MAX_LEN_CUDA else "chunkwise"
        return "parallel" if seq_len <= PARALLEL_MAX_LEN else "chunkwise"
    if name not in BACKENDS:
        valid = ["auto", *BACKENDS]
        if name == "mlstm_kernels":
            raise ValueError(
                "mLSTM backend 'mlstm_kernels' is not available (needs CUDA and the optional "
                f"'mlstm_kernels' package); valid backends: {valid}"
            )
        if name == "triton":
            raise ValueError(
                f"mLSTM backend 'triton' is not available (needs the optional 'triton' package); "
                f"valid backends: {valid}"
            )
        raise ValueError(f"unknown mLSTM backend {name!r}; valid backends: {valid}")
    if name == "triton" and device.type != "cuda" and not _triton.interpret_requested():
        raise ValueError(
            f"mLSTM backend 'triton' needs CUDA tensors, got device {device} (CPU tensors run only in Triton's "
            "interpreter, TRITON_INTERPRET=1, which is meant for tests)"
        )
    if name == "mlstm_kernels" and segmented:
        raise ValueError("mLSTM backend 'mlstm_kernels' does not support segment_ids (cluster-causal mode)")
    return name


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    igate: torch.Tensor,
    fgate: torch.Tensor,
    segment_ids: torch.Tensor | None,
    chunk_size: int,
) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, NH, S, DH), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape (B, NH, S, DH); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, NH, S, _ = q.shape
    for gname, gate in (("igate", igate), ("fgate", fgate)):
        if gate.shape != (B, NH, S):
            raise ValueError(
                f"{gname} must have shape (B, NH, S) = {(B, NH, S)} to match q {tuple(q.shape)}, "
                f"got {tuple(gate.shape)}"
            )
    if S == 0:
        raise ValueError(f"empty sequence: q has shape {tuple(q.shape)}")
    for tname, t in (("q", q), ("k", k), ("v", v), ("igate", igate), ("fgate", fgate)):
        if not t.is_floating_point():
            raise ValueError(f"{tname} must be a floating point tensor, got dtype {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{tname} is on {t.device} but q is on {q.device}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if segment_ids is not None:
        if not isinstance(segment_ids, torch.Tensor) or segment_ids.is_floating_point():
            raise ValueError("segment_ids must be an integer tensor of shape (S,) or (B, S)")
        if segment_ids.shape not in ((S,), (B, S)):
            raise ValueError(
                f"segment_ids must have shape (S,) = {(S,)} or (B, S) = {(B, S)}, got {tuple(segment_ids.shape)}"
            )
        # a data check (a host sync): skipped inside compiled graphs, where it would break the graph
        ordered = torch.compiler.is_compiling() or bool((segment_ids[..., 1:] >= segment_ids[..., :-1]).all())
        if S > 1 and not ordered:
            raise ValueError("segment_ids must be non-decreasing along the sequence dimension")


def mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    igate: torch.Tensor,
    fgate: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 64,
    eps: float = 1e-6,
    reverse: bool = False,
) -> torch.Tensor:
    """mLSTM cell, stabilised parallel semantics (Vision-LSTM / xLSTM).

    Args:
        q, k, v: ``(B, NH, S, DH)``; keys are scaled by ``1 / sqrt(DH)`` inside.
        igate, fgate: ``(B, NH, S)`` gate PRE-activations (exponential input gate, sigmoid forget gate).
        segment_ids: optional ``(S,)`` or ``(B, S)`` non-decreasing integer ids. Token t then reads the
            memory at the end of its own segment: it sees every token s with ``seg(s) <= seg(t)``.
            ``segment_ids = arange(S)`` is the plain causal case.
        backend: "auto", "parallel", "chunkwise", "recurrent" or (CUDA only) "triton", "mlstm_kernels".
        chunk_size: chunk length for "chunkwise".
        eps: added to the normaliser.
        reverse: scan the sequence from its end (token t reads every s >= t); the same as flipping every input
            along S and flipping ``h`` back. The parallel, chunkwise and triton backends do it without flipping
            ``q, k, v`` (the backward blocks of fine-tuning; chunkwise when its chunks tile the sequence); the others
            flip.
            Not with ``segment_ids``.

    Returns:
        h: ``(B, NH, S, DH)`` in the dtype of ``q`` (half inputs are computed with float32 gates/states).
    """
    _validate(q, k, v, igate, fgate, segment_ids, chunk_size)
    if reverse and segment_ids is not None:
        raise ValueError("reverse=True takes no segment_ids (reverse the segments by flipping the inputs)")
    S = q.shape[2]
    name = resolve_backend(backend, S, q.device, segment_ids is not None, head_dim=q.shape[-1])
    kernel = BACKENDS[name]
    if reverse and name in ("parallel", "chunkwise", "triton"):
        return kernel(q, k, v, igate, fgate, segment_ids=None, chunk_size=chunk_size, eps=eps, reverse=True)
    if reverse:
        q, k, v = (t.flip(2) for t in (q, k, v))
        h = kernel(q, k, v, igate.flip(2), fgate.flip(2), segment_ids=None, chunk_size=chunk_size, eps=eps)
        return h.flip(2)
    return kernel(q, k, v, igate, fgate, segment_ids=segment_ids, chunk_size=chunk_size, eps=eps)
