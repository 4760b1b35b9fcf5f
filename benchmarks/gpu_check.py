"""GPU checks and the papers' throughput numbers in one command (about 5 minutes on one H100/H200-class GPU).

    python benchmarks/gpu_check.py [--quick] [--out benchmarks/results/gpu_check.json] [--sections ...]
        [--backends ...] [--budget 300] [--dry-run]

Sections (each guarded: a failing case records its error and the rest still runs; a global time budget skips what
is left once it is spent, recording the skip):

- ``triton_parity``: the "triton" backend against "parallel" on the GPU, outputs and gradients of q, k, v, igate,
  fgate; float32 (IEEE dots, against the float64 parallel form) and bf16 (against float32 math on the same rounded
  inputs); plain causal, shared and per-sample segments (ragged), reversed; ViL-T's head dim 96;
- ``fixture_parity``: the official ViL mini fixture's logits, per backend;
- ``kernel_agreement``: forward of every backend against the float64 parallel form (S = 64 / 196 / 576);
- ``inference``: images/s of ``vil_tiny``, ``vil_small``, ``vil_base`` at 224 px, batch 256, bf16 autocast, no
  grad, per backend;
- ``pretrain``: images/s and peak memory of one MAL pretraining step (``MALPretrainer`` with the paper's decoder:
  width 512, depth 8, 16 heads; AdamW) of ``mal_tiny`` and ``mal_base`` at 192 px (their presets), batch 64, bf16
  autocast, per backend that reads segments (not "mlstm_kernels");
- ``finetune``: the same for a supervised fine-tuning step (``create_model(name, image_size=224)``, cross-entropy,
  AdamW) at 224 px, batch 64;
- ``mamba``: the Mamba encoders (``vim_tiny``, ``arm_tiny``) beside ``vil_tiny`` and ``vit_tiny``: inference at 224
  and 448 px with ``auto`` backends, then each selective-scan backend (``parallel``, ``mamba_ssm`` where
  installed) against the CPU ``loop`` backend's outputs (``scan_parity``), and a MAL pretraining step of each at
  192 px;
- ``compiled``: eager against ``mal.compile_blocks`` (each ViL block pair one ``torch.compile`` graph around the
  cell), backend ``auto``: ViL-T inference, the MAL-T pretraining step and the ViL-T fine-tuning step as above,
  each pair one after the other; on CUDA, inference also with ``mode="reduce-overhead"`` (the compiled blocks
  replayed as CUDA graphs: whether graphs help). ``compiled_speedup`` in the JSON (``inference/<model>/cudagraphs``
  for the graphs). Last, as its compiles take the longest.

Backends: "parallel", "chunkwise", and "triton" / "mlstm_kernels" where registered (``--backends`` picks some). A
step is timed with CUDA events after one warm-up call (which also compiles the Triton kernels: the first run on a
machine spends part of its budget compiling, later runs read Triton's cache); the median of ``--reps`` calls is
reported. On the GPU each section runs in its own process (a kernel fault poisons its CUDA context; the parent then
records the section's error and goes on); rows are written as they finish, so a killed section keeps its rows.

``--quick``: ViL-T / MAL-T only, batch 32, 2 reps, the parity checks at one size. ``--dry-run``: every section on
the CPU with the micro models at 32 px, batch 2, 1 rep, one thread ("triton" only under ``TRITON_INTERPRET=1``): a
smoke test of the script, no numbers. Writes JSON (atomically) and prints one line per row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mal.io import write_json
from mal.kernels import list_backends, mlstm, resolve_backend
from mal.kernels import triton as triton_backend

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "vil2_mini.safetensors"
SECTIONS = (
    "triton_parity", "fixture_parity", "kernel_agreement", "inference", "pretrain", "finetune", "mamba", "compiled",
)  # fmt: skip
DECODER = dict(decoder_dim=512, decoder_depth=8, decoder_heads=16)  # MAL-v2 Table 12, configs/pretrain/_imagenet.yaml
NUM_CLASSES = 1000
PARITY_TOL = {"float32": 1e-4, "bfloat16": 2e-2}  # max |err| / max(1, max |ref|), as in tests/test_kernels*.py


class Bench:
    """Device, timing and the time budget shared by the sections."""

    def __init__(self, device: str, reps: int, deadline: float, sink: Callable[[list[dict]], None] | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.reps = reps
        self.deadline = deadline
        self.sink = sink  # called with the section's rows after each row (a child process writes them out)

    def out_of_time(self) -> bool:
        return time.time() > self.deadline

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_memory(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_mem_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def time(self, fn: Callable[[], object]) -> float:
        """Median seconds of ``fn()`` after one warm-up call (CUDA events on the GPU)."""
        fn()
        self.sync()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]


def guarded(bench: Bench, rows: list[dict], row: dict, fn: Callable[[], dict]) -> None:
    """Runs one case; records its result, an OOM, an error or a skip (time budget) in ``row``; prints it."""
    if bench.out_of_time():
        row["skipped"] = "time budget spent"
    else:
        t0 = time.time()
        try:
            row.update(fn())
        except torch.OutOfMemoryError:
            row["oom"] = True
        except Exception as e:  # one failing case must not stop the other sections
            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"[:1000]
        row["wall_s"] = round(time.time() - t0, 2)
    rows.append(row)
    print(json.dumps(row), flush=True)
    if bench.sink is not None:
        bench.sink(rows)


# ----------------------------------------------------------------------------------------------------------
# kernels


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).abs().max() / max(1.0, float(ref.abs().max())))


def _parity_inputs(B: int, NH: int, S: int, DH: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(S + DH)
    q, k, v = (torch.randn(B, NH, S, DH, generator=g, dtype=torch.float64) for _ in range(3))
    ig = torch.randn(B, NH, S, generator=g, dtype=torch.float64) * 2
    fg = torch.randn(B, NH, S, generator=g, dtype=torch.float64) * 2 + 2
    return [t.to(device) for t in (q, k, v, ig, fg)]


def _with_grads(inputs: list[torch.Tensor], **kw) -> list[torch.Tensor]:
    """``[h, dq, dk, dv, digate, dfgate]`` for a fixed upstream gradient."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    h = mlstm(*inputs, **kw)
    up = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(h)
    return [h.detach(), *torch.autograd.grad(h, inputs, up)]


def _segments(kind: str, B: int, S: int, device: torch.device) -> torch.Tensor | None:
    if kind == "shared":  # 4x4 clusters with a ragged last one, as MAL's pretraining layouts have
        return (torch.arange(S) // 16).to(device)
    if kind == "per_sample":  # ragged ids per sample, one of them a segment over several chunks
        rows = [torch.arange(S) // 7, (torch.arange(S) >= S // 3).long() + (torch.arange(S) >= S - 5).long()]
        return torch.stack([rows[b % 2] for b in range(B)]).to(device)
    return None


def triton_parity(bench: Bench, quick: bool) -> list[dict]:
    rows: list[dict] = []
    if "triton" not in list_backends() or (not bench.cuda and not triton_backend.interpret_requested()):
        reason = "triton not installed" if "triton" not in list_backends() else "no CUDA and no TRITON_INTERPRET=1"
        print(json.dumps(row := {"skipped": reason}), flush=True)
        return [row]
    # one head dim (ViL-T's), so that one set of kernels is compiled; 577 is prime (a padded last chunk)
    sizes = [(20, 16)] if not bench.cuda else ([(196, 96)] if quick else [(196, 96), (577, 96)])
    B, NH = 2, (1 if not bench.cuda else 4)
    highest = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # IEEE float32 everywhere: the parallel form's cuBLAS too
    try:
        for S, DH in sizes:
            for case in ("causal", "shared", "per_sample", "reverse"):
                seg = _segments(case, B, S, bench.device)
                kw = dict(segment_ids=seg, reverse=case == "reverse")
                row = {"S": S, "DH": DH, "B": B, "NH": NH, "case": case}

                def run(S=S, DH=DH, kw=kw) -> dict:
                    inputs = _parity_inputs(B, NH, S, DH, bench.device)
                    ref = _with_grads(inputs, backend="parallel", **kw)
                    out = _with_grads([t.float() for t in inputs], backend="triton", **kw)
                    names = ("h", "dq", "dk", "dv", "digate", "dfgate")
                    err32 = {n: _rel_err(x, y) for n, x, y in zip(names, out, ref, strict=True)}
                    bf = [t.to(torch.bfloat16) for t in inputs[:3]]
                    gates = [t.float() for t in inputs[3:]]
                    ref_bf = mlstm(*[t.float() for t in bf], *gates, backend="parallel", **kw)
                    h_bf = mlstm(*bf, *gates, backend="triton", **kw)
                    err_bf = _rel_err(h_bf, ref_bf)
                    ok = max(err32.values()) <= PARITY_TOL["float32"] and err_bf <= PARITY_TOL["bfloat16"]
                    return {"float32_rel_err": err32, "bf16_h_rel_err": err_bf, "ok": ok}

                guarded(bench, rows, row, run)
    finally:
        torch.set_float32_matmul_precision(highest)
    return rows


def fixture_parity(bench: Bench, backends: list[str]) -> list[dict]:
    from safetensors.torch import load_file

    from mal.models import vil_from_official

    tensors = load_file(FIXTURE)
    state = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    rows: list[dict] = []
    for backend in backends:

        def run(backend=backend) -> dict:
            model = vil_from_official(state, image_size=32, patch_size=4, num_classes=10, backend=backend)
            model = model.to(bench.device).eval()
            with torch.no_grad():
                logits = model(tensors["input"].to(bench.device)).cpu()
            return {"max_abs_err": float((logits - tensors["logits"]).abs().max())}

        guarded(bench, rows, {"backend": backend}, run)
    return rows


def kernel_agreement(bench: Bench, backends: list[str], quick: bool) -> list[dict]:
    rows: list[dict] = []
    sizes = [(20, 16)] if not bench.cuda else [(64, 96), (196, 96)] + ([] if quick else [(576, 96)])
    for S, DH in sizes:
        inputs = _parity_inputs(2, 4, S, DH, bench.device)
        ref = mlstm(*inputs, backend="parallel")
        for backend in backends:
            for dtype in (torch.float32, torch.bfloat16):

                def run(backend=backend, dtype=dtype, inputs=inputs, ref=ref) -> dict:
                    q, k, v, i, f = inputs
                    h = mlstm(q.to(dtype), k.to(dtype), v.to(dtype), i.float(), f.float(), backend=backend)
                    return {"rel_err": _rel_err(h, ref)}

                guarded(bench, rows, {"S": S, "DH": DH, "backend": backend, "dtype": str(dtype)}, run)
    return rows


# ----------------------------------------------------------------------------------------------------------
# throughput


def _autocast(bench: Bench):
    return torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=bench.cuda)


def _backend(name: str, backend: str) -> dict:
    """The model option that picks a kernel backend (ViT has none: attention is SDPA's choice)."""
    return {} if name.startswith("vit_") else {"backend": backend}


def inference(
    bench: Bench,
    models: list[str],
    backends: list[str],
    image: int,
    batch: int,
    compiled: bool = False,
    compile_mode: str | None = None,
    **extra,
) -> list[dict]:
    """Images/s of a classifier's forward (no grad, bf16 autocast on CUDA); ``compiled``: its blocks compiled, with
    ``torch.compile``'s ``compile_mode`` (``"reduce-overhead"``: CUDA graphs)."""
    from mal.models import compile_blocks, create_model

    rows: list[dict] = []
    for name in models:
        for backend in backends:

            def run(name=name, backend=backend) -> dict:
                bench.reset_memory()
                model = create_model(
                    name, image_size=image, num_classes=NUM_CLASSES, **_backend(name, backend), **extra
                )
                model = model.to(bench.device).eval()
                if compiled:
                    compile_blocks(model, mode=compile_mode)
                x = torch.randn(batch, 3, image, image, device=bench.device)

                def fwd() -> None:
                    with torch.no_grad(), _autocast(bench):
                        model(x)

                sec = bench.time(fwd)
                return {"img_per_s": batch / sec, "sec_per_batch": sec, "peak_mem_gb": bench.peak_mem_gb()}

            row = {"model": name, "backend": backend, "image": image, "batch": batch, "compiled": compiled}
            guarded(bench, rows, row if compile_mode is None else dict(row, compile_mode=compile_mode), run)
    return rows


def _train_step_rows(
    bench: Bench,
    kind: str,
    models: list[str],
    backends: list[str],
    image: int | None,
    batch: int,
    compiled: bool = False,
    **extra,
) -> list[dict]:
    """One optimizer step per call: ``pretrain`` (MALPretrainer, the model's own preset resolution) or
    ``finetune`` (classifier at ``image`` px, cross-entropy); ``compiled``: the encoder's blocks compiled."""
    from mal.engine.optim import build_optimizer, param_groups
    from mal.models import compile_blocks, create_encoder, create_model
    from mal.pretrain import MALPretrainer, ObjectiveConfig

    rows: list[dict] = []
    for name in models:
        for backend in backends:

            def run(name=name, backend=backend) -> dict:
                bench.reset_memory()
                torch.manual_seed(0)
                if kind == "pretrain":
                    encoder = create_encoder(name, backend=backend, **extra)
                    model = MALPretrainer(encoder, ObjectiveConfig(**DECODER))
                    size = encoder.cfg.image_size
                else:
                    model = create_model(name, image_size=image, num_classes=NUM_CLASSES, backend=backend, **extra)
                    size = image
                model = model.to(bench.device).train()
                if compiled:
                    compile_blocks(model)
                optimizer = build_optimizer(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
                x = torch.randn(batch, 3, size, size, device=bench.device)
                y = torch.randint(0, NUM_CLASSES, (batch,), device=bench.device)

                def step() -> None:
                    with _autocast(bench):
                        loss = model(x)["loss"] if kind == "pretrain" else F.cross_entropy(model(x), y)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                sec = bench.time(step)
                return {
                    "image": size,
                    "img_per_s": batch / sec,
                    "sec_per_step": sec,
                    "peak_mem_gb": bench.peak_mem_gb(),
                }

            row = {"model": name, "backend": backend, "batch": batch, "compiled": compiled}
            guarded(bench, rows, row, run)
    return rows


def scan_parity(bench: Bench) -> list[dict]:
    """Every selective-scan backend on the device against the CPU ``loop`` backend (float32, with gradients)."""
    from mal.kernels.ssm import list_scan_backends, selective_scan

    rows: list[dict] = []
    g = torch.Generator().manual_seed(0)
    Bn, S, I, N = 4, 196, 384, 16  # Vim-T's inner width at 224 px
    inputs = [torch.randn(Bn, S, I, generator=g), torch.rand(Bn, S, I, generator=g) * 0.2,
              -torch.rand(I, N, generator=g) - 0.5, torch.randn(Bn, S, N, generator=g),
              torch.randn(Bn, S, N, generator=g), torch.randn(I, generator=g)]  # fmt: skip
    ref_in = [t.clone().requires_grad_() for t in inputs]
    ref = selective_scan(*ref_in, backend="loop")
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_in)
    for backend in [b for b in list_scan_backends() if b != "loop" or not bench.cuda]:

        def run(backend=backend) -> dict:
            xs = [t.to(bench.device).requires_grad_() for t in inputs]
            y = selective_scan(*xs, backend=backend)
            grads = torch.autograd.grad(y.square().sum(), xs)
            errs = [_rel_err(a.cpu(), b) for a, b in zip((y, *grads), (ref, *ref_grads), strict=True)]
            return {"max_rel_err": max(errs), "ok": max(errs) < PARITY_TOL["float32"]}

        guarded(bench, rows, {"check": "scan_parity", "backend": backend}, run)
    return rows


def mamba(bench: Bench, cfg: dict, micro: dict) -> list[dict]:
    """The ``mamba`` section (module docstring)."""
    from mal.kernels.ssm import list_scan_backends

    rows = scan_parity(bench)
    models, image, batch = cfg["mamba_models"] + cfg["mamba_refs"], cfg["image"], cfg["infer_batch"]
    for size in (image, 2 * image):
        rows += [dict(r, kind="inference") for r in inference(bench, models, ["auto"], size, batch, **micro)]
    scans = [b for b in list_scan_backends() if b != "loop" or not bench.cuda]
    rows += [dict(r, kind="inference") for r in inference(bench, cfg["mamba_models"], scans, image, batch, **micro)]
    rows += [dict(r, kind="pretrain") for r in _train_step_rows(
        bench, "pretrain", cfg["mamba_models"], ["auto"], None, cfg["train_batch"])]  # fmt: skip
    return rows


def auto_choices(bench: Bench, models: list[str]) -> dict[str, dict[str, str]]:
    """What ``backend="auto"`` runs for each model's head dim, at 196 tokens, causal and segmented."""
    from mal.models.registry import model_config

    out = {}
    for name in models:
        cfg = model_config(name)
        DH = cfg.inner // cfg.num_heads
        out[name] = {
            "head_dim": DH,
            "causal": resolve_backend("auto", 196, bench.device, False, head_dim=DH),
            "segmented": resolve_backend("auto", 196, bench.device, True, head_dim=DH),
        }
    return out


# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--backends", nargs="+", default=None, help="default: every registered backend")
    p.add_argument("--quick", action="store_true", help="ViL-T / MAL-T only, batch 32, 2 reps")
    p.add_argument("--dry-run", action="store_true", help="CPU smoke test: micro models, 32 px, batch 2, 1 rep")
    p.add_argument("--infer-batch", type=int, default=None, help="default 256 (quick: 32)")
    p.add_argument("--train-batch", type=int, default=None, help="default 64 (quick: 32)")
    p.add_argument("--reps", type=int, default=None, help="default 5 (quick: 2, dry run: 1)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds; cases after it are skipped and recorded")
    p.add_argument(
        "--isolate", action=argparse.BooleanOptionalAction, default=None, help="a process per section (default: on GPU)"
    )
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # set for child processes
    p.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> dict:
    """Models, sizes and backends of a run (no device work)."""
    available = [b for b in list_backends() if b != "recurrent"]
    if args.dry_run:
        available = [b for b in available if b in ("parallel", "chunkwise")]
        if "triton" in list_backends() and triton_backend.interpret_requested():
            available.append("triton")
    backends = args.backends or available
    if args.dry_run:
        return dict(
            device="cpu",
            backends=backends,
            infer_models=["vil_micro"],
            train_models=["mal_micro"],
            mamba_models=["vim_micro", "arm_micro"],
            mamba_refs=["vil_micro", "vit_micro"],
            image=32,
            infer_batch=args.infer_batch or 2,
            train_batch=args.train_batch or 2,
            reps=args.reps or 1,
        )
    quick = args.quick
    return dict(
        device="cuda",
        backends=backends,
        infer_models=["vil_tiny"] if quick else ["vil_tiny", "vil_small", "vil_base"],
        train_models=["mal_tiny"] if quick else ["mal_tiny", "mal_base"],
        mamba_models=["vim_tiny", "arm_tiny"],
        mamba_refs=["vil_tiny", "vit_tiny"],
        image=224,
        infer_batch=args.infer_batch or (32 if quick else 256),
        train_batch=args.train_batch or (32 if quick else 64),
        reps=args.reps or (2 if quick else 5),
    )


def run_section(section: str, bench: Bench, cfg: dict, args: argparse.Namespace) -> list[dict]:
    backends = cfg["backends"]
    # the micro models run at 32 px with 4 px patches in the dry run; the paper's models keep their presets
    micro = dict(patch_size=4) if args.dry_run else {}
    if section == "triton_parity":
        return triton_parity(bench, args.quick)
    if section == "fixture_parity":
        return fixture_parity(bench, backends)
    if section == "kernel_agreement":
        return kernel_agreement(bench, backends, args.quick)
    if section == "inference":
        return inference(bench, cfg["infer_models"], backends, cfg["image"], cfg["infer_batch"], **micro)
    segmented = [b for b in backends if b != "mlstm_kernels"]  # the pretraining encoder reads segments
    if section == "pretrain":
        return _train_step_rows(bench, "pretrain", cfg["train_models"], segmented, None, cfg["train_batch"])
    if section == "finetune":
        models = cfg["train_models"]
        return _train_step_rows(bench, "finetune", models, backends, cfg["image"], cfg["train_batch"], **micro)
    if section == "mamba":
        return mamba(bench, cfg, micro)
    if section == "compiled":  # eager, then compiled blocks, per case: the default backend, the smallest models
        rows: list[dict] = []
        infer, train, batch = cfg["infer_models"][:1], cfg["train_models"][:1], cfg["train_batch"]
        # CUDA graphs only where there are some (on the CPU the mode compiles the same graphs again)
        for compiled, mode in [(False, None), (True, None)] + [(True, "reduce-overhead")] * bench.cuda:
            rows += [dict(r, kind="inference") for r in inference(
                bench, infer, ["auto"], cfg["image"], cfg["infer_batch"], compiled, mode, **micro)]  # fmt: skip
        for kind in ("pretrain", "finetune"):
            image, extra = (None, {}) if kind == "pretrain" else (cfg["image"], micro)
            for compiled in (False, True):
                rows += [dict(r, kind=kind) for r in _train_step_rows(
                    bench, kind, train, ["auto"], image, batch, compiled=compiled, **extra)]  # fmt: skip
        return rows
    raise ValueError(f"unknown section {section!r}; valid: {SECTIONS}")


def compiled_speedup(rows: list[dict]) -> dict[str, float]:
    """Per case of the ``compiled`` section (``kind/model``, ``kind/model/cudagraphs`` for ``reduce-overhead``):
    compiled img/s over eager img/s."""
    speed = {(r["kind"], r["model"], _variant(r)): r["img_per_s"] for r in rows if "img_per_s" in r}
    out = {}
    for (kind, model, variant), img_per_s in speed.items():
        eager = speed.get((kind, model, "eager"))
        if variant != "eager" and eager:
            out[f"{kind}/{model}" + ("" if variant == "compiled" else f"/{variant}")] = img_per_s / eager
    return out


def _variant(row: dict) -> str:
    """``eager``, ``compiled`` (torch.compile's default mode) or ``cudagraphs`` (``reduce-overhead``)."""
    if not row["compiled"]:
        return "eager"
    mode = row.get("compile_mode")
    return {None: "compiled", "reduce-overhead": "cudagraphs"}.get(mode, mode)


def run_section_in_child(section: str, args: argparse.Namespace, deadline: float) -> list[dict]:
    """Runs one section in a fresh process; returns its rows, plus an error row if the process failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, __file__, "--sections", section, "--child-out", str(out), "--deadline", str(deadline)]
        cmd += ["--quick"] * args.quick + ["--dry-run"] * args.dry_run
        cmd += ["--backends", *args.backends] if args.backends else []
        for flag in ("infer_batch", "train_batch", "reps"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        # grace beyond the budget: the case running at the deadline finishes (a compile, a large model)
        timeout = max(60.0, deadline - time.time() + 120.0)
        try:
            proc = subprocess.run(cmd, timeout=timeout)
            failure = f"section process exited with {proc.returncode}" if proc.returncode else None
        except subprocess.TimeoutExpired:
            failure = f"section process killed after {timeout:.0f} s"
        rows = json.loads(out.read_text()) if out.exists() else []
    if failure:
        rows.append({"error": failure})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = plan(args)
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --dry-run for a CPU smoke test)")
    deadline = args.deadline if args.deadline is not None else time.time() + args.budget
    if args.dry_run:  # OpenMP's spin-waiting makes small CPU cases very slow on busy cores
        torch.set_num_threads(1)
    if args.child_out is not None:  # a child: one section, rows written after each case
        bench = Bench(cfg["device"], cfg["reps"], deadline, sink=lambda rows: write_json(args.child_out, rows))
        rows = run_section(args.sections[0], bench, cfg, args)
        write_json(args.child_out, rows)
        return {args.sections[0]: rows}
    isolate = args.isolate if args.isolate is not None else cfg["device"] == "cuda"
    bench = Bench(cfg["device"], cfg["reps"], deadline)
    t0 = time.time()
    result: dict = {
        "device": torch.cuda.get_device_name() if bench.cuda else "cpu",
        "torch": torch.__version__,
        "dry_run": args.dry_run,
        "quick": args.quick,
        "plan": cfg,
        "auto_backend": auto_choices(bench, cfg["infer_models"] + cfg["train_models"]),
    }
    print(json.dumps({k: result[k] for k in ("device", "torch", "plan", "auto_backend")}), flush=True)
    for section in args.sections:
        print(f"--- {section}", flush=True)
        if isolate:
            result[section] = run_section_in_child(section, args, deadline)
        else:
            result[section] = run_section(section, bench, cfg, args)
    result["seconds"] = time.time() - t0
    result["compiled_speedup"] = compiled_speedup(result.get("compiled", []))
    ran = [r for r in result.get("triton_parity", []) if "skipped" not in r]
    result["triton_parity_ok"] = all(r.get("ok") is True for r in ran) if ran else None
    write_json(args.out, result)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
