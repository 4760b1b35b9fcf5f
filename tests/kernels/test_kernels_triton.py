"""Tests for the "triton" mLSTM backend (mal.kernels.triton) against the parallel reference: outputs and gradients of
q, k, v, igate and fgate, causal, segmented (shared and per-sample ragged ids), reversed, bf16, extreme gates.

Without CUDA the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is set here before triton is first
imported (Triton reads it when the kernels are decorated). With CUDA the same tests run the compiled kernels on the
GPU. Shapes are tiny because the interpreter executes every program in Python.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import FIXTURES, ROOT

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import mal.kernels as K  # noqa: E402
from mal.kernels import (  # noqa: E402
    BACKENDS,
    PARALLEL_MAX_LEN,
    TRITON_AUTO_MAX_HEAD_DIM,
    list_backends,
    mlstm,
    resolve_backend,
)
from mal.kernels import triton as T  # noqa: E402

KERN = T._load()
DEVICE = "cpu" if KERN.INTERPRET else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("triton kernels were built without the interpreter and there is no CUDA", allow_module_level=True)

F32 = {"rtol": 1e-4, "atol": 1e-4}  # float32 kernels against the float64 reference, atol relative to max |ref|
LAUNCHED = ("state_fwd_kernel", "chunk_fwd_kernel", "state_bwd_kernel", "chunk_bwd_kernel")


@pytest.fixture
def launches(monkeypatch):
    """Counts the launches of each Triton kernel, so that no test passes without running them."""
    counts = dict.fromkeys(LAUNCHED, 0)

    class Spy:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            counts[self.name] += 1
            return self.fn[grid]

    for name in LAUNCHED:
        monkeypatch.setattr(KERN, name, Spy(name, getattr(KERN, name)))
    return counts


def make_inputs(B, NH, S, DH, seed=0, igate_scale=2.0, fgate_shift=2.0):
    """float64 (q, k, v, igate, fgate) on the test device."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, NH, S, DH, generator=g, dtype=torch.float64) for _ in range(3))
    ig = torch.randn(B, NH, S, generator=g, dtype=torch.float64) * igate_scale
    fg = torch.randn(B, NH, S, generator=g, dtype=torch.float64) * 2.0 + fgate_shift
    return [t.to(DEVICE) for t in (q, k, v, ig, fg)]


def with_grads(inputs, **kw):
    """Output and gradients of (q, k, v, igate, fgate), in float64, for a fixed random upstream gradient."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    h = mlstm(*inputs, **kw)
    up = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(h)
    grads = torch.autograd.grad(h, inputs, up)
    return h.detach().double(), [g.double() for g in grads]


def close(x, y, rtol, atol, msg=None):
    """assert_close with ``atol`` relative to the reference's scale (max |y|, at least 1); NaN fails."""
    scale = max(1.0, float(y.abs().max()))
    torch.testing.assert_close(x, y, rtol=rtol, atol=atol * scale, msg=msg)


def assert_matches_parallel(inputs, launches, chunk_size=16, **kw):
    """float32 triton (outputs and all five gradients) against the float64 parallel backend."""
    ref_h, ref_g = with_grads(inputs, backend="parallel", **kw)
    h, g = with_grads([t.float() for t in inputs], backend="triton", chunk_size=chunk_size, **kw)
    assert launches["chunk_fwd_kernel"] >= 1 and launches["chunk_bwd_kernel"] >= 1
    close(h, ref_h, **F32)
    for name, x, y in zip(("q", "k", "v", "igate", "fgate"), g, ref_g, strict=True):
        close(x, y, **F32, msg=lambda m, name=name: f"grad {name}: {m}")


def seg_from_sizes(sizes):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(DEVICE)


# ----------------------------------------------------------------------------------------------------------
# numerics against the parallel backend


@pytest.mark.parametrize(("S", "DH"), [(16, 16), (37, 24), (64, 16)], ids=["one-chunk", "padded-DH24", "4-chunks"])
def test_causal_matches_parallel(launches, S, DH):
    """Plain causal: one chunk, three chunks with a padded last chunk and DH = 24 (padded to 32), four chunks."""
    assert_matches_parallel(make_inputs(2, 2, S, DH, seed=S), launches)


def test_segmented_matches_parallel(launches):
    """Shared ragged segments that straddle chunk boundaries (chunks of 16: the query ranges are not the chunks)."""
    seg = seg_from_sizes([3, 5, 1, 9, 2, 7, 10])
    assert_matches_parallel(make_inputs(2, 2, 37, 24, seed=3), launches, segment_ids=seg)


def test_per_sample_segments_with_a_segment_over_several_chunks(launches):
    """(B, S) ids: sample 0 has a 30-token segment over chunks 0-2 (chunk 1 reads nothing, chunk 2 reads 32 queries,
    two tiles); sample 1 is plain causal as ids."""
    seg = torch.stack([seg_from_sizes([2, 30, 5]), torch.arange(37, device=DEVICE)])
    assert_matches_parallel(make_inputs(2, 2, 37, 16, seed=4), launches, segment_ids=seg)


def test_reverse_matches_parallel(launches):
    """reverse=True: the kernels index q, k, v, h backwards (nothing of size (B, NH, S, DH) is flipped)."""
    assert_matches_parallel(make_inputs(2, 2, 37, 16, seed=5), launches, reverse=True)


@pytest.mark.parametrize("segmented", [False, True])
def test_extreme_gates_match_parallel(launches, segmented):
    """Large input gates and strong forgetting: masked pairs and padding rows would overflow exp (inf * 0 = NaN in
    the gradients); they must stay exactly out of every sum."""
    inputs = make_inputs(2, 2, 45, 16, seed=2, igate_scale=15.0, fgate_shift=-10.0)
    seg = seg_from_sizes([16, 16, 8, 5]) if segmented else None
    assert_matches_parallel(inputs, launches, segment_ids=seg)


def test_bf16_forward(launches):
    """bf16 q, k, v: bf16 dots with float32 gates, states and accumulation; output in bf16. Compared with float32
    math on the same rounded inputs (the interpreter also rounds float32 -> bf16 differently from a GPU)."""
    q, k, v, ig, fg = make_inputs(2, 2, 37, 24, seed=6)
    seg = seg_from_sizes([3, 5, 1, 9, 2, 7, 10])
    for s in (None, seg):
        bf = [t.to(torch.bfloat16) for t in (q, k, v)]
        ref = mlstm(*[t.float() for t in bf], ig.float(), fg.float(), backend="parallel", segment_ids=s)
        out = mlstm(*bf, ig.float(), fg.float(), backend="triton", segment_ids=s, chunk_size=16)
        assert out.dtype == torch.bfloat16
        close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert launches["chunk_fwd_kernel"] == 2


def test_strided_inputs_and_output_layout(launches):
    """q, k, v as transposed views of (B, S, NH, DH) projections (as the ViL layer passes them), float64 in: computed
    in float32, returned in float64; h is a view of a (B, S, NH, DH) tensor, so ``h.transpose(1, 2)`` is contiguous."""
    B, S, NH, DH = 2, 20, 2, 16
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, S, 3 * NH * DH, generator=g, dtype=torch.float64).to(DEVICE)
    q, k, v = (t.reshape(B, S, NH, DH).transpose(1, 2) for t in x.split(NH * DH, dim=-1))
    ig, fg = torch.randn(B, S, 2 * NH, generator=g, dtype=torch.float64).to(DEVICE).transpose(1, 2).split(NH, dim=1)
    assert not q.is_contiguous()
    h = mlstm(q, k, v, ig, fg, backend="triton")
    assert h.dtype == torch.float64 and h.transpose(1, 2).is_contiguous()
    close(h, mlstm(q, k, v, ig, fg, backend="parallel"), **F32)
    assert launches["chunk_fwd_kernel"] == 1


def test_in_place_change_of_the_output_is_caught(launches):
    """The backward reads the saved output (as fused attention does, for ``rowsum(dh * h)``): an in-place change of
    it is caught by autograd's version counter, never a silently wrong gradient. Out of place it works."""
    leaves = [t.float().requires_grad_() for t in make_inputs(1, 2, 20, 16, seed=8)]
    h = mlstm(*leaves, backend="triton")
    (h * 2.0).sum().backward()
    assert all(t.grad is not None for t in leaves)
    h = mlstm(*leaves, backend="triton")
    h.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()
    assert launches["chunk_bwd_kernel"] == 1


# ----------------------------------------------------------------------------------------------------------
# chunking, registration and dispatch


def test_chunk_length():
    assert T.chunk_length(196, 64) == 64
    assert T.chunk_length(196, 7) == 16  # tl.dot needs 16
    assert T.chunk_length(196, 100) == 128
    assert T.chunk_length(1000, 512) == 128
    assert T.chunk_length(5, 64) == 16
    assert T.chunk_length(37, 64) == 64


def test_registered_and_dispatched(monkeypatch):
    """Registered where triton is installed; "auto" picks it on CUDA only when its kernels import and the head dim
    fits (causal and segmented, any length); on the CPU never."""
    assert "triton" in list_backends() and BACKENDS["triton"] is T.mlstm_triton
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for seg in (False, True):
        assert resolve_backend("auto", 196, cpu, seg) == "parallel"
        assert resolve_backend("auto", PARALLEL_MAX_LEN + 1, cpu, seg) == "chunkwise"
    monkeypatch.setattr(T, "is_available", lambda: True)
    for seg in (False, True):
        for S in (196, 4096):
            assert resolve_backend("auto", S, cuda, seg) == "triton"
            assert resolve_backend("auto", S, cuda, seg, head_dim=96) == "triton"  # ViL-T
            assert resolve_backend("auto", S, cuda, seg, head_dim=384) != "triton"  # ViL-B: the fallbacks
    assert resolve_backend("auto", 196, cuda, True, head_dim=TRITON_AUTO_MAX_HEAD_DIM + 1) == "parallel"
    assert resolve_backend("auto", 196, cpu, False) == "parallel"
    monkeypatch.setattr(T, "is_available", lambda: False)  # e.g. a broken triton: the old fallbacks
    assert resolve_backend("auto", 196, cuda, True) == "parallel"
    assert resolve_backend("auto", 4096, cuda, True) == "chunkwise"


def test_cpu_needs_the_interpreter(monkeypatch):
    """backend="triton" on CPU tensors is a clear error outside Triton's interpreter."""
    q = torch.zeros(1, 1, 4, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="'triton' needs CUDA tensors.*TRITON_INTERPRET=1"):
        mlstm(q, q, q, q[..., 0], q[..., 0], backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # asked for, but the kernels were compiled for the GPU
    monkeypatch.setattr(KERN, "INTERPRET", False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        T.mlstm_triton(q, q, q, q[..., 0], q[..., 0])
    with pytest.raises(ValueError, match="reverse=True takes no segment_ids"):
        mlstm(q, q, q, q[..., 0], q[..., 0], backend="triton", reverse=True, segment_ids=torch.zeros(4, dtype=int))


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(K, "_optional_checked", True)
    monkeypatch.delitem(BACKENDS, "triton", raising=False)
    with pytest.raises(ValueError, match="'triton' is not available.*optional 'triton' package"):
        resolve_backend("triton", 16, torch.device("cuda"), False)


def run_python(code: str) -> None:
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_kernels_are_imported_on_first_use_only():
    run_python(
        "import sys, mal.kernels as K; names = K.list_backends(); assert 'triton' in names, names; "
        "assert 'mal.kernels._triton_kernels' not in sys.modules, 'kernels imported'"
    )


def test_without_triton_the_backend_is_absent():
    """With triton blocked from importing, mal.kernels imports, "triton" is not registered and asking for it names
    the missing package."""
    run_python(
        "import sys; sys.modules['triton'] = None\n"
        "import torch, mal.kernels as K\n"
        "assert 'triton' not in K.list_backends()\n"
        "assert K.resolve_backend('auto', 196, 'cuda', True) == 'parallel'\n"
        "q = torch.zeros(1, 1, 4, 16)\n"
        "try:\n"
        "    K.mlstm(q, q, q, q[..., 0], q[..., 0], backend='triton')\n"
        "except ValueError as e:\n"
        "    assert \"optional 'triton' package\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )


# ----------------------------------------------------------------------------------------------------------
# in the models


FIXTURE = FIXTURES / "vil2_mini.safetensors"
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"


def test_official_fixture_logits_with_triton(launches):
    """The official ViL's logits (tests/fixtures) through every block of the model, forward and reversed scans."""
    from safetensors.torch import load_file

    from mal.models import vil_from_official

    tensors = load_file(FIXTURE)
    state = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    model = vil_from_official(state, image_size=32, patch_size=4, num_classes=10, backend="triton").to(DEVICE)
    with torch.no_grad():
        logits = model(tensors["input"].to(DEVICE)).cpu()
    torch.testing.assert_close(logits, tensors["logits"], atol=2e-5, rtol=0)
    assert launches["chunk_fwd_kernel"] > 0


def test_pretrain_mode_encoder_matches_parallel(launches):
    """The cluster-causal (pretrain mode) micro encoder: features and every parameter gradient as with "parallel"."""
    from mal.models import create_encoder

    torch.manual_seed(0)
    ref = create_encoder("mal_micro", backend="parallel").to(DEVICE)
    enc = create_encoder("mal_micro", backend="triton").to(DEVICE)
    enc.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    outs = []
    for model in (ref, enc):
        out = model(x, mode="pretrain")
        out.square().mean().backward()
        outs.append(out.detach())
    close(outs[1], outs[0], **F32)
    for (name, p_ref), p in zip(ref.named_parameters(), enc.parameters(), strict=True):
        close(p.grad, p_ref.grad, **F32, msg=lambda m, name=name: f"grad {name}: {m}")
    assert launches["chunk_bwd_kernel"] > 0


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.py: argument parsing and every section's CPU code path (micro models), the triton parity
    checks in the interpreter; then the per-section child process path for one section."""
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(["--dry-run", "--no-isolate", "--backends", "parallel", "--out", str(out)])
    assert json.loads(out.read_text())["plan"] == result["plan"]
    interpreted = DEVICE == "cpu"  # the dry run is on the CPU: triton's parity rows only in the interpreter
    for section in gpu_check.SECTIONS:
        rows = result[section]
        if section == "triton_parity" and not interpreted:
            assert result["triton_parity_ok"] is None and "skipped" in rows[0]
            continue
        assert rows and not any("error" in r or "skipped" in r for r in rows), (section, rows)
    if interpreted:
        assert result["triton_parity_ok"] is True
        assert {r["case"] for r in result["triton_parity"]} == {"causal", "shared", "per_sample", "reverse"}
    for section in ("inference", "pretrain", "finetune"):
        assert all(r["img_per_s"] > 0 for r in result[section])
    assert {key.split("/")[0] for key in result["compiled_speedup"]} == {"inference", "pretrain", "finetune"}
    rows = [
        {"kind": "inference", "model": "m", "compiled": False, "img_per_s": 10.0},
        {"kind": "inference", "model": "m", "compiled": True, "img_per_s": 15.0},
        {"kind": "inference", "model": "m", "compiled": True, "compile_mode": "reduce-overhead", "img_per_s": 20.0},
        {"kind": "finetune", "model": "m", "compiled": True, "img_per_s": 5.0},  # no eager row: no ratio
    ]
    assert gpu_check.compiled_speedup(rows) == {"inference/m": 1.5, "inference/m/cudagraphs": 2.0}
    out2 = tmp_path / "child.json"
    cmd = [sys.executable, str(GPU_CHECK), "--dry-run", "--isolate", "--sections", "fixture_parity"]
    proc = subprocess.run([*cmd, "--backends", "parallel", "--out", str(out2)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out2.read_text())["fixture_parity"]
    assert rows[0]["backend"] == "parallel" and rows[0]["max_abs_err"] < 2e-5
