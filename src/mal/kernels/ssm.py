"""Mamba's selective scan (S6, Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
https://arxiv.org/abs/2312.00752, Algorithm 2) with interchangeable backends, as the mLSTM cell has::

    h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t        (per channel i: a diagonal (N,) state)
    y_t = C_t . h_t + D u_t

zero-order hold for ``A`` and Euler for ``B``, as ``mamba_ssm``'s reference ``selective_scan_ref``.

Backends (``selective_scan(..., backend=...)``):

* ``"loop"``: one Python step per token on a ``(B, I, N)`` state that stays in cache, with a hand-written backward.
  Only the states at chunk boundaries (every ``chunk_size`` tokens) are kept; the backward recomputes the states of
  one chunk at a time, so memory is ``S / chunk_size`` states instead of ``S``. The CPU path.
* ``"parallel"``: the recurrence as an associative scan in ``ceil(log2 S)`` vectorized steps over the whole
  ``(B, S, I, N)`` tensor (Hillis & Steele), differentiated by autograd: no Python loop over tokens, ``log2 S``
  times the memory traffic.
* ``"mamba_ssm"``: the fused CUDA kernel of the ``mamba_ssm`` package (the optional ``mal-vision[mamba]`` extra), CUDA
  tensors only; registered where it imports.

``"auto"`` picks ``mamba_ssm`` for CUDA tensors where installed, else ``loop`` on the CPU (faster than
``parallel`` at the encoders' shapes: ``benchmarks/scan_speed.py``) and ``parallel`` on CUDA (a kernel launch per
token would dominate there). Every backend is causal along ``S``: ``y_t`` reads ``u, delta, B, C`` at ``<= t`` only.

Shapes: ``u, delta``: ``(B, S, I)`` (``delta`` after its softplus); ``A``: ``(I, N)`` (negative); ``B, C``:
``(B, S, N)``; ``D``: ``(I,)`` or None. Returns ``y``: ``(B, S, I)`` in the dtype of ``u``; the state runs in
float32 at least (half inputs under autocast).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["SCAN_BACKENDS", "list_scan_backends", "resolve_scan_backend", "selective_scan"]


class _LoopScan(torch.autograd.Function):
    """The recurrence one step per token, states checkpointed every ``chunk`` tokens (see the module docstring).

    Time-major inputs: u, delta (S, B, I); A (I, N); B, C (S, B, N); all of one float dtype. Returns y (S, B, I)
    without the ``D u`` term. Gradients for all five inputs; no double backward.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):  # noqa: D102 (documented on the class)
        S, Bn, I = u.shape
        N = A.shape[1]
        T = max(1, min(chunk, S))
        du = delta * u
        y = u.new_empty(S, Bn, I)
        starts = u.new_zeros(math.ceil(S / T), Bn, I, N)  # the state entering each chunk
        buf = u.new_empty(T, Bn, I, N)
        for c, s0 in enumerate(range(0, S, T)):
            n = min(T, S - s0)
            if c > 0:
                starts[c] = buf[T - 1]
            _chunk_states(du, delta, A, B, s0, n, starts[c], buf)
            y[s0 : s0 + n] = torch.einsum("tbin,tbn->tbi", buf[:n], C[s0 : s0 + n])
        ctx.save_for_backward(u, delta, A, B, C, starts)
        ctx.chunk = T
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):  # noqa: D102
        u, delta, A, B, C, starts = ctx.saved_tensors
        T = ctx.chunk
        gy = gy.to(u.dtype)
        S, Bn, I = u.shape
        du = delta * u
        g_du, g_delta, g_B, g_C = torch.empty_like(u), torch.zeros_like(delta), torch.empty_like(B), torch.empty_like(C)
        g_A = torch.zeros(Bn, *A.shape, dtype=A.dtype, device=A.device)  # summed over the batch at the end
        g_h = torch.zeros_like(starts[0])  # dL/dh_t, (B, I, N), carried backward in time
        buf = torch.empty(T, *starts.shape[1:], dtype=u.dtype, device=u.device)
        for c in range(starts.shape[0] - 1, -1, -1):
            s0 = c * T
            n = min(T, S - s0)
            _chunk_states(du, delta, A, B, s0, n, starts[c], buf)  # recomputed
            g_C[s0 : s0 + n] = torch.einsum("tbi,tbin->tbn", gy[s0 : s0 + n], buf[:n])  # y_t = C_t . h_t
            for k in range(n - 1, -1, -1):
                t = s0 + k
                g_h.addcmul_(gy[t, :, :, None], C[t, :, None, :])
                # h_t = a_t * h_{t-1} + du_t B_t
                g_du[t] = torch.bmm(g_h, B[t, :, :, None]).squeeze(-1)
                g_B[t] = torch.bmm(du[t, :, None, :], g_h).squeeze(1)
                if t > 0:  # a_0 multiplies h_{-1} = 0: no gradient
                    prev = buf[k - 1] if k > 0 else starts[c]
                    a = torch.exp(delta[t, :, :, None] * A)  # (B, I, N)
                    g_log_a = g_h * prev * a  # through a = exp(delta A)
                    g_delta[t] = (g_log_a * A).sum(-1)
                    g_A.addcmul_(g_log_a, delta[t, :, :, None])
                    g_h.mul_(a)
        g_delta += g_du * u
        return g_du * delta, g_delta, g_A.sum(0), g_B, g_C, None


def _chunk_states(du, delta, A, B, s0: int, n: int, start: torch.Tensor, buf: torch.Tensor) -> None:
    """The states ``h_{s0} .. h_{s0 + n - 1}`` into ``buf[:n]``, from ``start`` = ``h_{s0 - 1}`` (zeros at 0)."""
    for k in range(n):
        t = s0 + k
        drive = du[t, :, :, None] * B[t, :, None, :]  # (B, I, N)
        prev = start if k == 0 else buf[k - 1]
        torch.addcmul(drive, torch.exp(delta[t, :, :, None] * A), prev, out=buf[k])


@torch.compiler.disable  # a step per token: traced, the graph would unroll every step (a graph break instead)
def _scan_loop(u, delta, A, B, C, *, chunk_size: int) -> torch.Tensor:
    """Batch-major in and out (B, S, I); see :class:`_LoopScan`."""
    u, delta, B, C = (t.transpose(0, 1).contiguous() for t in (u, delta, B, C))  # time-major
    return _LoopScan.apply(u, delta, A, B, C, chunk_size).transpose(0, 1)


def _scan_parallel(u, delta, A, B, C, *, chunk_size: int) -> torch.Tensor:
    """The associative scan of ``(a, x) o (a', x') = (a a', a x' + x)`` in log2(S) steps; autograd backward."""
    a = torch.exp(delta[..., None] * A)  # (B, S, I, N)
    x = (delta * u)[..., None] * B[:, :, None, :]
    S, shift = u.shape[1], 1
    while shift < S:
        x = torch.cat([x[:, :shift], torch.addcmul(x[:, shift:], a[:, shift:], x[:, :-shift])], dim=1)
        if 2 * shift < S:
            a = torch.cat([a[:, :shift], a[:, shift:] * a[:, :-shift]], dim=1)
        shift *= 2
    return torch.einsum("bsin,bsn->bsi", x, C)


def _scan_mamba_ssm(u, delta, A, B, C, *, chunk_size: int) -> torch.Tensor:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    u_, d_, B_, C_ = (x.transpose(1, 2).contiguous() for x in (u, delta, B, C))  # channels-first, as it wants
    return selective_scan_fn(u_, d_, A.contiguous(), B_, C_).transpose(1, 2)


#: Backend registry: name -> function(u, delta, A, B, C, *, chunk_size) -> y without the D term (batch-major).
SCAN_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"loop": _scan_loop, "parallel": _scan_parallel}
_optional_checked = False


def _register_optional() -> None:
    global _optional_checked
    if not _optional_checked:
        _optional_checked = True
        if torch.cuda.is_available():
            try:
                import mamba_ssm.ops.selective_scan_interface  # noqa: F401
            except Exception:  # noqa: BLE001 (missing, or built against another torch: not usable either way)
                return
            SCAN_BACKENDS["mamba_ssm"] = _scan_mamba_ssm


def list_scan_backends() -> list[str]:
    """The selective-scan backends usable here (``mamba_ssm`` only where CUDA and the package are present)."""
    _register_optional()
    return sorted(SCAN_BACKENDS)


def resolve_scan_backend(backend: str, device: torch.device) -> str:
    """The backend ``"auto"`` stands for on ``device``; any other name is checked and returned."""
    _register_optional()
    if backend == "auto":
        if device.type == "cuda":
            return "mamba_ssm" if "mamba_ssm" in SCAN_BACKENDS else "parallel"
        return "loop"
    if backend not in SCAN_BACKENDS:
        known = ", ".join(["auto", *list_scan_backends()])
        hint = (
            " (needs CUDA and the mamba_ssm package: pip install 'mal-vision[mamba]')" if backend == "mamba_ssm" else ""
        )
        raise ValueError(f"unknown selective-scan backend {backend!r}{hint}; available: {known}")
    if backend == "mamba_ssm" and device.type != "cuda":
        raise ValueError("selective-scan backend 'mamba_ssm' runs on CUDA tensors only; use 'loop' on the CPU")
    return backend


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    chunk_size: int = 16,
) -> torch.Tensor:
    """``y (B, S, I)`` of the selective scan (module docstring). ``chunk_size``: the ``loop`` backend's checkpoint
    interval (memory ``S / chunk_size`` states; the backward recomputes one chunk at a time)."""
    name = resolve_scan_backend(backend, u.device)
    dtype = u.dtype
    acc = torch.promote_types(dtype, torch.float32)
    with torch.autocast(u.device.type, enabled=False):
        u32, delta, B, C = (t.to(acc) for t in (u, delta, B, C))
        y = SCAN_BACKENDS[name](u32, delta, A.to(acc), B, C, chunk_size=chunk_size)
        if D is not None:
            y = torch.addcmul(y, u32, D.to(acc))
    return y.to(dtype)
