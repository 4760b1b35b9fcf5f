"""Tests for mal.kernels: parallel / chunkwise / recurrent mLSTM backends and the dispatcher."""

from __future__ import annotations

import math

import pytest
import torch

import mal.kernels as K
from mal.kernels import (
    BACKENDS,
    PARALLEL_MAX_LEN,
    PARALLEL_MAX_LEN_CUDA,
    list_backends,
    mlstm,
    resolve_backend,
)
from mal.kernels.chunkwise import get_layout, pack_segments
from mal.kernels.cuda import padded_lengths

PURE = ("parallel", "chunkwise", "recurrent")
F64 = {"rtol": 1e-6, "atol": 1e-8}  # float64 agreement: round-off is ~1e-12 here
F32 = {"rtol": 1e-4, "atol": 1e-4}


def make_inputs(B, NH, S, DH, dtype=torch.float64, seed=0, igate_scale=2.0, fgate_shift=2.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, NH, S, DH, generator=g, dtype=dtype) for _ in range(3))
    ig = torch.randn(B, NH, S, generator=g, dtype=dtype) * igate_scale
    fg = torch.randn(B, NH, S, generator=g, dtype=dtype) * 2.0 + fgate_shift
    return [t.requires_grad_() for t in (q, k, v, ig, fg)]


def run_with_grads(inputs, seed=1, **kw):
    """Output and gradients of (q, k, v, igate, fgate) for a fixed random upstream gradient."""
    h = mlstm(*inputs, **kw)
    up = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(h)
    grads = torch.autograd.grad(h, inputs, up, allow_unused=True, materialize_grads=True)
    return h.detach(), grads


def close(x, y, rtol, atol, msg=None):
    """assert_close with ``atol`` relative to the reference's scale (max |y|, at least 1)."""
    scale = max(1.0, float(y.abs().max())) if y.numel() else 1.0
    torch.testing.assert_close(x, y, rtol=rtol, atol=atol * scale, msg=msg)


def assert_same(a, b, tol):
    h_a, g_a = a
    h_b, g_b = b
    close(h_a, h_b, **tol)
    for name, x, y in zip(("q", "k", "v", "igate", "fgate"), g_a, g_b, strict=True):
        close(x, y, **tol, msg=lambda m, name=name: f"grad {name}: {m}")


def seg_from_sizes(sizes):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def naive_mlstm(q, k, v, ig, fg, seg=None, eps=1e-6):
    """Ground truth: explicit Python loops over (b, h, t, s) written from the formulas."""
    B, NH, S, DH = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        ids = list(range(S)) if seg is None else (seg if seg.dim() == 1 else seg[b]).tolist()
        for hd in range(NH):
            logf = [-math.log1p(math.exp(-float(x))) for x in fg[b, hd]]
            Fc = [sum(logf[: t + 1]) for t in range(S)]
            for t in range(S):
                r = max(s for s in range(S) if ids[s] == ids[t])
                logD = {s: Fc[r] - Fc[s] + float(ig[b, hd, s]) for s in range(S) if ids[s] <= ids[t]}
                m = max(logD.values())
                ct = {s: float(q[b, hd, t] @ k[b, hd, s]) / math.sqrt(DH) * math.exp(logD[s] - m) for s in logD}
                n = max(abs(sum(ct.values())), math.exp(-m))
                out[b, hd, t] = sum(ct[s] * v[b, hd, s] for s in ct) / (n + eps)
    return out


# ----------------------------------------------------------------------------------------------------------
# ground truth


def test_single_token_by_hand():
    """S=1: m = igate, C = q.k/sqrt(DH), n = max(|C|, exp(-igate)), h = C v / (n + eps)."""
    q = torch.tensor([[[[1.0, 2.0, 0.0, -1.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[0.5, 1.0, 3.0, 1.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0, -2.0, 4.0, 0.5]]]], dtype=torch.float64)
    for igv, fgv in ((0.3, -1.0), (-4.0, 5.0)):
        ig = torch.full((1, 1, 1), igv, dtype=torch.float64)
        fg = torch.full((1, 1, 1), fgv, dtype=torch.float64)
        c = (0.5 + 2.0 + 0.0 - 1.0) / 2.0  # q.k / sqrt(4)
        expected = c * v / (max(abs(c), math.exp(-igv)) + 1e-6)
        for be in PURE:
            torch.testing.assert_close(mlstm(q, k, v, ig, fg, backend=be), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("S", [1, 5, 11])
def test_parallel_matches_naive_loops(S):
    """The parallel backend equals a direct double loop over the formulas (float64)."""
    inputs = [t.detach() for t in make_inputs(2, 2, S, 4, seed=S)]
    torch.testing.assert_close(mlstm(*inputs, backend="parallel"), naive_mlstm(*inputs), rtol=1e-10, atol=1e-12)


def test_segmented_matches_naive_loops():
    """Cluster-causal semantics (shared and per-sample ragged ids) equal the double loop (float64)."""
    inputs = [t.detach() for t in make_inputs(2, 2, 10, 4, seed=3)]
    shared = seg_from_sizes([3, 3, 2, 2])
    per_sample = torch.stack([seg_from_sizes([1, 4, 5]), seg_from_sizes([2, 2, 2, 1, 3])])
    for seg in (shared, per_sample):
        ref = naive_mlstm(*inputs, seg=seg)
        for be in PURE:
            out = mlstm(*inputs, segment_ids=seg, backend=be, chunk_size=4)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# backends agree (outputs and gradients)


@pytest.mark.parametrize("S", [1, 5, 16, 37, 64, 100])
def test_backends_agree_float64(S):
    inputs = make_inputs(2, 2, S, 8, seed=S)
    ref = run_with_grads(inputs, backend="parallel")
    assert_same(run_with_grads(inputs, backend="recurrent"), ref, F64)
    for cs in (4, 7, 16, 64):
        assert_same(run_with_grads(inputs, backend="chunkwise", chunk_size=cs), ref, F64)


@pytest.mark.parametrize("S", [37, 100])
def test_backends_agree_float32(S):
    inputs = make_inputs(2, 2, S, 8, dtype=torch.float32, seed=S)
    ref = run_with_grads(inputs, backend="parallel")
    assert_same(run_with_grads(inputs, backend="recurrent"), ref, F32)
    for cs in (7, 16):
        assert_same(run_with_grads(inputs, backend="chunkwise", chunk_size=cs), ref, F32)


@pytest.mark.parametrize(
    "seg",
    [
        seg_from_sizes([3, 3, 2, 3, 3, 2]),
        seg_from_sizes([1, 9, 2, 4]),
        torch.stack([seg_from_sizes([3, 3, 2, 3, 3, 2]), seg_from_sizes([5, 1, 7, 3])]),
        torch.stack([torch.arange(16), torch.zeros(16, dtype=torch.long)]),  # one sample: a single segment
    ],
    ids=["shared-ragged", "shared-long-segment", "per-sample", "per-sample-extreme"],
)
def test_segmented_backends_agree_float64(seg):
    inputs = make_inputs(2, 2, seg.shape[-1], 8, seed=7)
    ref = run_with_grads(inputs, backend="parallel", segment_ids=seg)
    assert_same(run_with_grads(inputs, backend="recurrent", segment_ids=seg), ref, F64)
    for cs in (1, 4, 7, 16, 64):
        assert_same(run_with_grads(inputs, backend="chunkwise", segment_ids=seg, chunk_size=cs), ref, F64)


def test_segmented_backends_agree_float32():
    seg = torch.stack([seg_from_sizes([16, 16, 8, 16, 16, 8]), seg_from_sizes([8] * 10)])
    inputs = make_inputs(2, 2, 80, 8, dtype=torch.float32, seed=11)
    ref = run_with_grads(inputs, backend="parallel", segment_ids=seg)
    assert_same(run_with_grads(inputs, backend="chunkwise", segment_ids=seg, chunk_size=32), ref, F32)
    assert_same(run_with_grads(inputs, backend="recurrent", segment_ids=seg), ref, F32)


@pytest.mark.parametrize("be", PURE)
def test_arange_segments_equal_causal(be):
    S = 21
    inputs = make_inputs(2, 2, S, 8, seed=5)
    ref = run_with_grads(inputs, backend="parallel")
    for seg in (torch.arange(S), torch.arange(S).expand(2, S), torch.arange(S) * 3 + 10):
        assert_same(run_with_grads(inputs, backend=be, segment_ids=seg, chunk_size=8), ref, F64)


# ----------------------------------------------------------------------------------------------------------
# cluster-causal structure: no leak from later segments, full read inside a segment


@pytest.mark.parametrize("be", PURE)
@pytest.mark.parametrize("per_sample", [False, True])
def test_no_leak_from_later_segments(be, per_sample):
    sizes = [3, 3, 2, 3, 3, 2]
    seg = seg_from_sizes(sizes)
    S = len(seg)
    if per_sample:
        seg = torch.stack([seg, seg_from_sizes([2, 4, 2, 3, 1, 4])])
    inputs = [t.detach() for t in make_inputs(2, 2, S, 8, seed=9)]
    base = mlstm(*inputs, backend=be, segment_ids=seg, chunk_size=5)
    for c in range(int(seg.max())):
        later = (seg > c).expand(2, S)  # (B, S)
        g = torch.Generator().manual_seed(c)
        pert = []
        for t in inputs:
            mask = later[:, None, :, None] if t.dim() == 4 else later[:, None, :]
            pert.append(torch.where(mask, t + 3.0 * torch.randn(t.shape, generator=g, dtype=t.dtype), t))
        out = mlstm(*pert, backend=be, segment_ids=seg, chunk_size=5)
        early = ~later
        assert later.any() and early.any()
        for b in range(2):
            torch.testing.assert_close(out[b][:, early[b]], base[b][:, early[b]], rtol=0, atol=1e-12)
            assert (out[b][:, later[b]] - base[b][:, later[b]]).abs().max() > 1e-3


@pytest.mark.parametrize("be", PURE)
def test_within_segment_read_is_full(be):
    """Perturbing the LAST token of a segment changes the FIRST token of that segment (not causal)."""
    seg = seg_from_sizes([3, 4, 2, 3])
    S = len(seg)
    inputs = [t.detach() for t in make_inputs(1, 2, S, 8, seed=4)]
    base = mlstm(*inputs, backend=be, segment_ids=seg, chunk_size=4)
    first, last = 3, 6  # segment 1 spans positions 3..6
    for j in range(1, 5):  # k, v, igate, fgate of the last token (q only affects its own output)
        pert = [t.clone() for t in inputs]
        pert[j][:, :, last] += 1.0
        out = mlstm(*pert, backend=be, segment_ids=seg, chunk_size=4)
        assert (out[:, :, first] - base[:, :, first]).abs().max() > 1e-4, j
        # earlier segments never see it
        torch.testing.assert_close(out[:, :, :first], base[:, :, :first], rtol=0, atol=1e-12)
    # and the plain causal mode does not let token 3 see token 6
    causal = mlstm(*inputs, backend=be)
    pert = [t.clone() for t in inputs]
    pert[2][:, :, last] += 1.0
    torch.testing.assert_close(mlstm(*pert, backend=be)[:, :, :last], causal[:, :, :last], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# numerical robustness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("be", PURE)
def test_no_nan_with_extreme_gates_and_padding(be, dtype):
    B, NH, S, DH = 2, 2, 37, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, NH, S, DH, generator=g, dtype=dtype) for _ in range(3))
    ig = torch.rand(B, NH, S, generator=g, dtype=dtype) * 60 - 30  # -30..30
    fg = torch.rand(B, NH, S, generator=g, dtype=dtype) * 40 - 20  # -20..20
    ig[0, 0, :10] = -30.0
    fg[1, 1, :] = 20.0
    fg[1, 0, :] = -20.0
    seg_cases = [None, seg_from_sizes([16, 16, 5]), torch.stack([torch.arange(S), torch.zeros(S, dtype=torch.long)])]
    for seg in seg_cases:
        inputs = [t.clone().requires_grad_() for t in (q, k, v, ig, fg)]
        h = mlstm(*inputs, backend=be, segment_ids=seg, chunk_size=7)
        assert torch.isfinite(h).all()
        grads = torch.autograd.grad(h.square().sum(), inputs, allow_unused=True, materialize_grads=True)
        for gr in grads:
            assert torch.isfinite(gr).all()


def test_extreme_gates_backends_agree_float64():
    inputs = make_inputs(2, 2, 45, 8, seed=2, igate_scale=15.0, fgate_shift=0.0)
    with torch.no_grad():
        inputs[4].mul_(5.0)
    seg = seg_from_sizes([16, 16, 8, 5])
    for s in (None, seg):
        ref = run_with_grads(inputs, backend="parallel", segment_ids=s)
        assert_same(run_with_grads(inputs, backend="chunkwise", segment_ids=s, chunk_size=16), ref, F64)
        assert_same(run_with_grads(inputs, backend="recurrent", segment_ids=s), ref, F64)


def test_decays_below_the_exp_clamp_agree_with_float64():
    """Strong forgetting (about -10 per step in log space) puts most allowed pairs of the decay matrix far below
    log(tiny) = -87.3 of float32, where the parallel forms clamp the exponent (``decay_exp_``): float32 results
    and gradients still match the float64 computation, and the masked pairs still get exactly zero gradient."""
    inputs = make_inputs(2, 2, 40, 8, seed=5, igate_scale=3.0, fgate_shift=-10.0)
    seg = seg_from_sizes([10, 10, 12, 8])
    for s in (None, seg):
        ref = run_with_grads(inputs, backend="recurrent", segment_ids=s)
        f32 = [t.detach().float().requires_grad_() for t in inputs]
        for be in ("parallel", "chunkwise"):
            h, grads = run_with_grads(f32, backend=be, segment_ids=s, chunk_size=16)
            assert_same((h.double(), [g.double() for g in grads]), ref, F32)
    q, k, v, ig, fg = (t.detach().float().requires_grad_() for t in inputs)
    for be in ("parallel", "chunkwise"):
        h = mlstm(q, k, v, ig, fg, backend=be, chunk_size=16)
        grads = torch.autograd.grad(h[:, :, :20].sum(), (k, v, ig, fg))
        for g in grads:  # the first 20 outputs never read tokens 20.. (exactly)
            assert torch.equal(g[:, :, 20:], torch.zeros_like(g[:, :, 20:])), be


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("be", PURE)
def test_half_precision_returns_input_dtype(be, dtype):
    inputs = [t.detach().to(dtype) for t in make_inputs(2, 2, 20, 8, dtype=torch.float32, seed=6)]
    ref = mlstm(*[t.float() for t in inputs], backend="parallel")  # same (rounded) inputs, float32 math
    out = mlstm(*inputs, backend=be, chunk_size=8)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    close(out.float(), ref, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------------------
# chunk layout


def test_pack_segments_greedy():
    assert pack_segments([16, 16, 8, 16, 16, 8], 64) == [[16, 16, 8, 16], [16, 8]]
    assert pack_segments([16, 16, 8, 16, 16, 8], 40) == [[16, 16, 8], [16, 16, 8]]
    assert pack_segments([3, 70, 2, 2], 8) == [[3], [70], [2, 2]]
    assert pack_segments([1] * 10, 4) == [[1] * 4, [1] * 4, [1, 1]]


def test_layout_plain_and_per_sample():
    lay = get_layout(None, 100, 64, torch.device("cpu"))
    assert (lay.NC, lay.L, lay.contiguous, lay.rloc) == (2, 50, True, None)  # balanced chunks
    lay = get_layout(None, 101, 7, torch.device("cpu"))
    assert (lay.NC, lay.L, lay.contiguous, lay.rloc) == (15, 7, True, None)  # last chunk padded
    seg = torch.stack([seg_from_sizes([3, 70, 2, 2]), seg_from_sizes([77])])
    lay = get_layout(seg, 77, 8, torch.device("cpu"))
    assert (lay.NC, lay.L, lay.contiguous) == (3, 77, False)
    assert lay.idx.shape == (2, 3 * 77) and lay.inv.shape == (2, 77)
    # every real token appears exactly once, in order
    for b in range(2):
        flat = lay.idx[b]
        assert torch.equal(flat[lay.inv[b]], torch.arange(77))


# ----------------------------------------------------------------------------------------------------------
# dispatcher


def test_list_backends_and_registry():
    names = list_backends()
    assert set(PURE) <= set(names)
    assert all(callable(BACKENDS[n]) for n in names)


def test_unknown_backend_raises():
    inputs = [t.detach() for t in make_inputs(1, 1, 4, 4)]
    with pytest.raises(ValueError, match=r"unknown mLSTM backend 'flash'.*parallel.*chunkwise.*recurrent"):
        mlstm(*inputs, backend="flash")
    with pytest.raises(ValueError, match="valid backends"):
        resolve_backend("nope", 10, torch.device("cpu"), False)


def test_bad_inputs_raise():
    q, k, v, ig, fg = [t.detach() for t in make_inputs(2, 2, 6, 4)]
    with pytest.raises(ValueError, match="non-decreasing"):
        mlstm(q, k, v, ig, fg, segment_ids=torch.tensor([0, 0, 1, 0, 2, 2]))
    with pytest.raises(ValueError, match="non-decreasing"):
        mlstm(q, k, v, ig, fg, segment_ids=torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 2]]))
    with pytest.raises(ValueError, match=r"segment_ids must have shape .*got \(5,\)"):
        mlstm(q, k, v, ig, fg, segment_ids=torch.arange(5))
    with pytest.raises(ValueError, match="integer tensor"):
        mlstm(q, k, v, ig, fg, segment_ids=torch.arange(6.0))
    with pytest.raises(ValueError, match=r"same shape.*k \(2, 2, 5, 4\)"):
        mlstm(q, k[:, :, :5], v, ig, fg)
    with pytest.raises(ValueError, match=r"igate must have shape .*got \(2, 6\)"):
        mlstm(q, k, v, ig[:, 0], fg)
    with pytest.raises(ValueError, match=r"fgate must have shape .*got \(2, 2, 7\)"):
        mlstm(q, k, v, ig, torch.zeros(2, 2, 7, dtype=fg.dtype))
    with pytest.raises(ValueError, match=r"q must have shape \(B, NH, S, DH\)"):
        mlstm(q[0], k[0], v[0], ig, fg)
    with pytest.raises(ValueError, match="chunk_size"):
        mlstm(q, k, v, ig, fg, backend="chunkwise", chunk_size=0)


def test_resolve_backend_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", 196, cpu, False) == "parallel"
    assert resolve_backend("auto", PARALLEL_MAX_LEN, cpu, True) == "parallel"
    assert resolve_backend("auto", PARALLEL_MAX_LEN + 1, cpu, False) == "chunkwise"
    assert resolve_backend("auto", 4096, cpu, True) == "chunkwise"
    assert resolve_backend("recurrent", 4096, cpu, True) == "recurrent"


def test_resolve_backend_cuda_logic(monkeypatch):
    """With mlstm_kernels registered (faked here), CUDA + causal picks it; segmented never does. (Our triton
    backend, which "auto" prefers where its kernels run, is switched off here; its choice is tested with it.)"""
    cuda = torch.device("cuda")
    monkeypatch.setattr(K._triton, "is_available", lambda: False)
    monkeypatch.setattr(K, "_optional_checked", True)
    monkeypatch.delitem(BACKENDS, "mlstm_kernels", raising=False)
    assert resolve_backend("auto", 196, cuda, False) == "parallel"
    assert resolve_backend("auto", PARALLEL_MAX_LEN_CUDA + 1, cuda, False) == "chunkwise"
    with pytest.raises(ValueError, match="'mlstm_kernels' is not available"):
        resolve_backend("mlstm_kernels", 196, cuda, False)
    monkeypatch.setitem(BACKENDS, "mlstm_kernels", lambda *a, **kw: None)
    assert resolve_backend("auto", 196, cuda, False) == "mlstm_kernels"
    assert resolve_backend("auto", 4096, cuda, False) == "mlstm_kernels"
    assert resolve_backend("auto", 196, cuda, True) == "parallel"
    assert resolve_backend("auto", PARALLEL_MAX_LEN_CUDA, cuda, True) == "parallel"
    assert resolve_backend("auto", 4096, cuda, True) == "chunkwise"
    assert resolve_backend("auto", 196, torch.device("cpu"), False) == "parallel"
    with pytest.raises(ValueError, match="does not support segment_ids"):
        resolve_backend("mlstm_kernels", 196, cuda, True)


def test_cuda_adapter_is_lazy_and_pads():
    import sys

    assert "mlstm_kernels" not in sys.modules or torch.cuda.is_available()
    assert padded_lengths(5, 96) == (16, 128)
    assert padded_lengths(64, 64) == (64, 64)
    assert padded_lengths(196, 96) == (256, 128)
    assert padded_lengths(256, 128) == (256, 128)
    assert padded_lengths(100, 8) == (128, 16)
    q = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="CUDA"):
        K.cuda.mlstm_kernels_chunkwise(q, q, q, q[..., 0], q[..., 0])
    with pytest.raises(ValueError, match="segment_ids"):
        K.cuda.mlstm_kernels_chunkwise(q, q, q, q[..., 0], q[..., 0], segment_ids=torch.arange(4))


def _mean_rel(a, b):
    return float((a.double() - b.double()).abs().mean() / b.double().abs().mean())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backends_agree():
    """On CUDA the pure backends agree (float32, with grads, also segmented)."""
    inputs = [t.detach().cuda().requires_grad_() for t in make_inputs(2, 4, 100, 96, dtype=torch.float32)]
    seg = torch.stack([seg_from_sizes([16, 16, 8, 16, 16, 8, 20]), seg_from_sizes([10] * 10)]).cuda()
    for s in (None, seg):
        ref = run_with_grads(inputs, backend="parallel", segment_ids=s)
        assert_same(run_with_grads(inputs, backend="chunkwise", segment_ids=s, chunk_size=32), ref, F32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mlstm_kernels_adapter_matches_forward():
    """mlstm_kernels (if installed) matches the forward pass approximately.

    Its Triton kernel runs its matmuls at reduced (TF32-like) precision: mean relative error ~1.5e-3 in
    float32 (max ~4e-2), ~1e-2 in bf16. Its backward uses NX-AI's convention (no gradient through the
    normaliser), so only dL/dv is comparable with the exact autograd gradient of the other backends.
    """
    if "mlstm_kernels" not in list_backends():
        pytest.skip("mlstm_kernels not installed")
    for S, DH in ((5, 8), (100, 96), (256, 64)):
        inputs = [t.detach().cuda().requires_grad_() for t in make_inputs(2, 4, S, DH, dtype=torch.float32)]
        ref_h, ref_g = run_with_grads(inputs, backend="parallel")
        h, g = run_with_grads(inputs, backend="mlstm_kernels")
        assert h.shape == ref_h.shape and h.dtype == ref_h.dtype
        assert _mean_rel(h, ref_h) < 1e-2
        assert _mean_rel(g[2], ref_g[2]) < 1e-2  # dv
        bf = [t.detach().bfloat16() for t in inputs]
        out = mlstm(*bf, backend="mlstm_kernels")
        assert out.dtype == torch.bfloat16 and _mean_rel(out, ref_h) < 5e-2
    expected = "triton" if "triton" in list_backends() and K._triton.is_available() else "mlstm_kernels"
    assert resolve_backend("auto", 100, torch.device("cuda"), False) == expected


@pytest.mark.parametrize("S", [37, 48])
@pytest.mark.parametrize("be", PURE)
def test_reverse_equals_flipping_the_sequence(be, S):
    """``reverse=True`` (the backward blocks of fine-tuning) is the causal scan of the flipped sequence, outputs and
    gradients. The parallel backend computes it without flipping q, k, v, and so does chunkwise when its chunks tile
    the sequence (48 = 3 x 16; 37 is prime: padded chunks, flipped inputs)."""
    inputs = make_inputs(2, 2, S, 8, seed=6)
    flipped = [t.detach().flip(2).requires_grad_() for t in inputs]
    up = torch.randn(2, 2, S, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h_ref = mlstm(*flipped, backend=be, chunk_size=16)
    g_ref = torch.autograd.grad(h_ref, flipped, up)
    h = mlstm(*inputs, backend=be, chunk_size=16, reverse=True)
    g = torch.autograd.grad(h, inputs, up.flip(2))
    close(h.detach(), h_ref.detach().flip(2), **F64)
    for name, x, y in zip(("q", "k", "v", "igate", "fgate"), g, g_ref, strict=True):
        close(x, y.flip(-1 if y.dim() == 3 else 2), **F64, msg=lambda m, name=name: f"grad {name}: {m}")
    with pytest.raises(ValueError, match="reverse=True takes no segment_ids"):
        mlstm(*inputs, backend=be, reverse=True, segment_ids=torch.zeros(S, dtype=torch.long))


@pytest.mark.parametrize("S", [48, 37])
@pytest.mark.parametrize("factored", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("be", PURE)
def test_inputs_with_the_tokens_innermost_give_the_same_outputs(be, reverse, factored, S, monkeypatch):
    """q, k, v in ``(B, NH, DH, S)`` memory (ViL's layer gives them so on CPU) are read as well as token-major ones,
    outputs (with and without autograd, which the chunkwise form's tiles take different ways) and gradients, in the
    rank-1 decay form and the direct one. 48 = 3 x 16 chunks: no padding, the chunkwise form works on tiles; 37 is
    prime: padded chunks, token-major copies."""
    if not factored:
        monkeypatch.setattr(K._utils, "FACTOR_MAX_SPREAD", 0.0)
    inputs = make_inputs(2, 2, S, 8, seed=7)
    cf = [t.detach().mT.contiguous().mT.requires_grad_() if t.dim() == 4 else t for t in inputs[:3]] + inputs[3:]
    assert all(t.mT.is_contiguous() and not t.is_contiguous() for t in cf[:3])
    up = torch.randn(2, 2, S, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h_ref = mlstm(*inputs, backend=be, chunk_size=16, reverse=reverse)
    h = mlstm(*cf, backend=be, chunk_size=16, reverse=reverse)
    close(h.detach(), h_ref.detach(), **F64)
    with torch.no_grad():
        close(mlstm(*cf, backend=be, chunk_size=16, reverse=reverse), h_ref.detach(), **F64)
    for x, y in zip(torch.autograd.grad(h, cf[:3], up), torch.autograd.grad(h_ref, inputs[:3], up), strict=True):
        close(x, y, **F64)


@pytest.mark.parametrize("tokens_innermost", [False, True])
def test_chunkwise_with_the_gpu_width_of_v(monkeypatch, tokens_innermost):
    """On GPUs the chunkwise form pads v's column of ones with zero columns to a width of DH + 8: the same outputs
    and gradients as the parallel form, causal and reversed, segmented (forced here on the CPU)."""
    monkeypatch.setattr(K.chunkwise, "_value_width", lambda DH, device: DH + 8)
    for reverse, seg in ((False, None), (True, None), (False, torch.arange(48) // 5)):
        inputs = make_inputs(2, 2, 48, 8, seed=8)
        if tokens_innermost:
            inputs = [t.detach().mT.contiguous().mT.requires_grad_() if t.dim() == 4 else t for t in inputs]
        kw = dict(segment_ids=seg, reverse=reverse)
        h, grads = run_with_grads(inputs, backend="chunkwise", chunk_size=16, **kw)
        h_ref, grads_ref = run_with_grads(inputs, backend="parallel", **kw)
        close(h, h_ref, **F64)
        for x, y in zip(grads, grads_ref, strict=True):
            close(x, y, **F64)


# ----------------------------------------------------------------------------------------------------------
# rank-1 (factorised) decay matrices and the causal chunk length


def _with_and_without_factors(monkeypatch, fn):
    """``fn()`` with the rank-1 decay form (asserting that it was taken) and with the direct form."""
    taken = []
    real = K._utils.decay_factors

    def spy(*args, **kw):
        out = real(*args, **kw)
        taken.append(out is not None)
        return out

    for mod in (K.parallel, K.chunkwise):
        monkeypatch.setattr(mod, "decay_factors", spy)
    factored = fn()
    assert taken and all(taken), "the factorised form was not taken"
    monkeypatch.setattr(K._utils, "FACTOR_MAX_SPREAD", 0.0)
    taken.clear()
    direct = fn()
    assert taken and not any(taken)
    return factored, direct


CASES = [
    ("parallel", 45, None, False),
    ("parallel", 45, "shared", False),
    ("parallel", 45, "per_sample", False),
    ("parallel", 45, None, True),
    ("chunkwise", 45, None, False),  # 3 x 15: no dummy slot
    ("chunkwise", 37, None, False),  # padded last chunk
    ("chunkwise", 45, None, True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("be", "S", "seg", "reverse"), CASES)
def test_rank1_decay_form_equals_the_direct_form(monkeypatch, be, S, seg, reverse, dtype):
    """``decay_factors``: ``(q k^T) * exp(u_s - Ur_t) = (alpha q)(beta k)^T`` gives the direct form's outputs and
    gradients (float64 to 1e-6, float32 to 1e-4), causal, segmented and reversed."""
    inputs = make_inputs(2, 2, S, 8, dtype=dtype, seed=S)
    segment_ids = {
        None: None,
        "shared": seg_from_sizes([4] * (S // 4) + [S % 4] * (S % 4 > 0)),
        "per_sample": torch.stack([torch.arange(S) // 3, torch.arange(S) // 7]),
    }[seg]
    kw = dict(backend=be, segment_ids=segment_ids, chunk_size=16, reverse=reverse)
    factored, direct = _with_and_without_factors(monkeypatch, lambda: run_with_grads(inputs, **kw))
    assert_same(factored, direct, F64 if dtype == torch.float64 else F32)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("be", ["parallel", "chunkwise"])
def test_rank1_decay_form_keeps_later_tokens_out_exactly(monkeypatch, be, reverse):
    """The rank-1 form's reference is the scan's first token, so changing tokens later in the scan leaves the
    earlier outputs bitwise unchanged (not only to round-off)."""
    inputs = [t.detach() for t in make_inputs(2, 2, 45, 8, seed=9)]
    later, early = (slice(30, 45), slice(0, 30)) if not reverse else (slice(0, 15), slice(15, 45))
    changed = [t.clone() for t in inputs]
    for t in changed:
        t[:, :, later] = torch.randn_like(t[:, :, later])

    def both():
        return [mlstm(*x, backend=be, chunk_size=15, reverse=reverse) for x in (inputs, changed)]

    (a, b), _ = _with_and_without_factors(monkeypatch, both)
    assert torch.equal(a[:, :, early], b[:, :, early])
    assert not torch.allclose(a[:, :, later], b[:, :, later])


def test_decay_factors_decline_where_they_would_lose_precision(monkeypatch):
    from mal.kernels._utils import decay_factors

    u = torch.linspace(0.0, 40.0, 50).expand(2, 3, 50).contiguous()  # spread 40 <= 44 (float32)
    U = torch.cummax(u, -1).values
    alpha, beta = decay_factors(u, U)
    E = torch.exp(u[..., None, :] - U[..., :, None])  # float32 exp of arguments up to 40: relative error ~5e-6
    torch.testing.assert_close(alpha[..., :, None] * beta[..., None, :], E, rtol=1e-5, atol=1e-6)
    assert decay_factors(u * 1.2, U * 1.2) is None  # spread 48 > 44
    assert decay_factors(u.double() * 1.2, U.double() * 1.2) is not None  # float64 allows 354
    assert decay_factors(u.half(), U.half()) is None  # beta k would overflow in half precision
    nan = u.clone()
    nan[0, 0, 3] = float("nan")
    assert decay_factors(nan, U) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert decay_factors(u, U) is None  # no host sync inside a compiled graph
    monkeypatch.undo()
    padded = u.clone()
    padded[..., -5:] = float("-inf")  # dummy slots do not count towards the spread, and get beta = 0
    alpha, beta = decay_factors(padded, U)
    assert torch.equal(beta[..., -5:], torch.zeros_like(beta[..., -5:]))


def test_causal_chunk_length_prefers_a_divisor():
    from mal.kernels.chunkwise import causal_chunk_length

    # ViL at 224 / 448 / 896 px: chunks tile the sequence; a prime length: balanced padded chunks
    assert [causal_chunk_length(S, 64) for S in (196, 784, 3136, 100, 197)] == [49, 56, 64, 50, 50]
    assert causal_chunk_length(101, 7) == 7
    lay = get_layout(None, 784, 64, torch.device("cpu"))
    assert (lay.NC, lay.L, lay.contiguous, lay.causal) == (14, 56, True, True)
