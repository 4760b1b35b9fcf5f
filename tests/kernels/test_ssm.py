"""The selective scan (mal.kernels.ssm): every backend against a step-by-step reference and a closed form, gradients
included, checkpointed chunks of every size, causality, dtypes, backend choice."""

from __future__ import annotations

import pytest
import torch

from mal.kernels.ssm import list_scan_backends, resolve_scan_backend, selective_scan

CPU_BACKENDS = ["loop", "parallel"]


def step_by_step(u, delta, A, B, C, D):  # noqa: ANN001, ANN201
    """The recurrence as written, one token at a time, through autograd."""
    h = torch.zeros(u.shape[0], *A.shape, dtype=u.dtype)
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
    return torch.stack(ys, 1)


def closed_form(u, delta, A, B, C, D):  # noqa: ANN001, ANN201
    """y_t = sum_{s <= t} C_t . (exp(sum_{r=s+1..t} delta_r A) * delta_s u_s B_s) + D u_t, all pairs at once."""
    cum = (delta[..., None] * A).cumsum(1)  # (B, S, I, N)
    S = u.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool).tril()  # [t, s]: s <= t
    decay = torch.exp(cum[:, :, None] - cum[:, None, :]) * causal[None, :, :, None, None]  # (B, t, s, I, N)
    drive = (delta * u)[..., None] * B[:, :, None, :]  # (B, S, I, N)
    h = (decay * drive[:, None]).sum(2)
    return torch.einsum("bsin,bsn->bsi", h, C) + u * D


def scan_inputs(Bn: int, S: int, I: int, N: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(Bn, S, I, dtype=dtype, generator=g)
    delta = torch.rand(Bn, S, I, dtype=dtype, generator=g) * 0.5
    A = -torch.rand(I, N, dtype=dtype, generator=g) * 4
    B, C = torch.randn(Bn, S, N, dtype=dtype, generator=g), torch.randn(Bn, S, N, dtype=dtype, generator=g)
    D = torch.randn(I, dtype=dtype, generator=g)
    return tuple(t.requires_grad_() for t in (u, delta, A, B, C, D))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("chunk", [1, 3, 16, 64])  # 37 tokens: partial last chunks, one chunk, chunks of one
def test_scan_matches_the_step_by_step_recurrence_to_1e6_with_gradients(backend, chunk):
    args = scan_inputs(2, 37, 5, 3)
    y = selective_scan(*args, backend=backend, chunk_size=chunk)
    ref = step_by_step(*args)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(y, closed_form(*args), rtol=1e-12, atol=1e-12)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), args)
    want = torch.autograd.grad((ref * w).sum(), args)
    for name, g, r in zip(["u", "delta", "A", "B", "C", "D"], grads, want, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-6, msg=f"gradient of {name}")
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scan_passes_gradcheck(backend):
    def f(*a):  # noqa: ANN002, ANN202
        return selective_scan(*a, backend=backend, chunk_size=2)

    assert torch.autograd.gradcheck(f, scan_inputs(1, 5, 3, 2))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scan_is_causal_along_the_sequence(backend):
    u, delta, A, B, C, D = (t.detach() for t in scan_inputs(2, 12, 4, 3))
    y = selective_scan(u, delta, A, B, C, D, backend=backend, chunk_size=5)
    u2, B2 = u.clone(), B.clone()
    u2[:, 7:] += 1.0
    B2[:, 7:] -= 1.0
    y2 = selective_scan(u2, delta, A, B2, C, D, backend=backend, chunk_size=5)
    assert torch.equal(y[:, :7], y2[:, :7])  # bit for bit: later tokens add nothing, not even a rounding
    assert (y[:, 7:] - y2[:, 7:]).abs().min() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float32_in_float32_out_and_bfloat16_keeps_a_float32_state(backend):
    args = [t.detach() for t in scan_inputs(2, 9, 5, 3)]
    ref = selective_scan(*args, backend=backend)
    y32 = selective_scan(*(a.float() for a in args), backend=backend)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), ref, rtol=1e-4, atol=1e-4)
    y16 = selective_scan(*(a.bfloat16() for a in args), backend=backend)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), ref, rtol=0.05, atol=0.05)


def test_backend_choice_and_errors():
    assert resolve_scan_backend("auto", torch.device("cpu")) == "loop"
    assert {"loop", "parallel"} <= set(list_scan_backends())
    with pytest.raises(ValueError, match="unknown selective-scan backend 'fast'.*available: auto"):
        resolve_scan_backend("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA tensors only|needs CUDA"):
        resolve_scan_backend("mamba_ssm", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backends_match_the_cpu_loop():  # pragma: no cover - CUDA only
    args = [t.detach() for t in scan_inputs(2, 50, 8, 4, torch.float32)]
    ref = selective_scan(*args, backend="loop")
    for backend in [b for b in list_scan_backends() if b != "loop"]:
        y = selective_scan(*(a.cuda() for a in args), backend=backend)
        torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4, msg=backend)
