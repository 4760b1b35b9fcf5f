"""Encoder forward throughput and peak memory against resolution: ViL-T (each mLSTM backend) and ViT-T.

    python benchmarks/resolution_scaling.py [--models vil_tiny vit_tiny] [--images 128 224 448]
        [--backends parallel chunkwise auto] [--recurrent] [--batch 8] [--threads 2] [--reps 3] [--quick]

Cases: every model in ``--models`` at every resolution in ``--images`` (default 128 ... 512 px, patch 16, so 64 to
1024 tokens), in the raster layout (``cluster_size=None``, ``scan_schedule="fixed:row"``: valid at every
resolution), ``finetune`` mode, no grad. ViL models (``vil_*``) run once per mLSTM backend: ``parallel``,
``chunkwise`` and ``auto`` by default, plus ``mlstm_kernels`` on CUDA when it is registered
(``mal.kernels.list_backends()``); ``recurrent`` only with ``--recurrent`` (a step-by-step reference: minutes per
case at 1024 tokens). ViT models (``vit_*``: pre-norm Transformer on ``scaled_dot_product_attention``, the same
patch and position embedding) have no backend option and run once. The micro presets get patch 16 as well, so
``vil_micro`` and ``vit_micro`` see the same token counts.

Each case runs in a fresh subprocess, so its peak memory is its own: on the CPU the child's peak resident memory
(ru_maxrss), on CUDA ``torch.cuda.max_memory_allocated``. A case is timed after one warm-up forward; the median of
``--reps`` forwards is reported. The cost per image of each case is also given relative to the same model and
backend at 224 px (``--ref-image``; the smallest resolution measured when that one is not), and a summary line per
model/backend gives ``cost(448)/cost(224)`` (the largest against the smallest resolution when those two are not
both measured) with its exponent in the token count: 1 for linear cost, 2 for quadratic.

CPU (default): float32, ``--threads`` 2, batch 8, 3 reps. When ``torch.cuda.is_available()`` (or with ``--device
cuda``) the same script runs on the GPU: bf16 autocast, batch 256 unless ``--batch`` is given, 10 reps,
``torch.cuda.synchronize()`` around every timed forward; a case that runs out of GPU memory is recorded as
``"oom"`` instead of stopping the benchmark. ``--quick`` is a smoke test: ``vil_micro`` and ``vit_micro`` at 64
and 128 px, batch 2, 1 rep, backends ``parallel`` and ``chunkwise`` (on a machine whose cores are busy, add
``--threads 1``: with 2 threads OpenMP's spin-waiting made quick cases up to 25x slower on the 2-core VM). Writes
``benchmarks/results/resolution_scaling.json`` (atomically) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import time
from pathlib import Path

import torch

from _child import run_in_child
from mal.io import write_json
from mal.runtime import retain_freed_memory

RESULTS = Path(__file__).parent / "results" / "resolution_scaling.json"
IMAGES = [128, 192, 224, 256, 320, 384, 448, 512]
PATCH = 16
# raster layout at every resolution: one patch per unit, row-major scan (4x4 clusters are ragged at 224 px)
RASTER = {"patch_size": PATCH, "layout": {"cluster_size": None, "scan_schedule": "fixed:row"}}
REF_IMAGE = 224
SUMMARY_PAIR = (224, 448)


def is_vit(model_name: str) -> bool:
    from mal.models import ViTConfig, model_config

    return isinstance(model_config(model_name), ViTConfig)


def run_case(model_name: str, image: int, backend: str | None, batch: int, reps: int, device: str, amp: bool) -> dict:
    """One measurement (called in a child process). ``backend=None`` for models without an mLSTM backend."""
    from mal.kernels import resolve_backend
    from mal.models import create_encoder

    torch.manual_seed(0)
    cuda = device == "cuda"
    overrides = dict(RASTER, image_size=image)
    if backend is not None:
        overrides["backend"] = backend
    enc = create_encoder(model_name, **overrides).eval().to(device)
    tokens = (image // PATCH) ** 2
    row = {
        "model": model_name,
        "family": "vil" if backend is not None else "vit",
        "backend": backend,
        # what "auto" runs (plain causal scan in finetune mode: not segmented)
        "resolved_backend": resolve_backend(backend, tokens, device, segmented=False) if backend else None,
        "image": image,
        "tokens": tokens,
        "layout": "raster",
        "batch": batch,
        "params_m": sum(p.numel() for p in enc.parameters()) / 1e6,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": "bfloat16 autocast" if amp else "float32",
        "oom": False,
    }

    def forward() -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            enc(x, mode="finetune")
        if cuda:
            torch.cuda.synchronize()

    try:
        x = torch.randn(batch, 3, image, image, device=device)
        with torch.no_grad():
            t0 = time.perf_counter()
            forward()  # warm-up: plans, allocator, kernel selection
            warmup = time.perf_counter() - t0
            times = []
            for _ in range(reps):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                forward()
                times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        peak_cuda = torch.cuda.max_memory_allocated() / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row.update(oom=True, img_per_s=None, ms_per_img=None, peak_mem_mb=peak_cuda, peak_rss_mb=rss)
        return row
    sec = sorted(times)[len(times) // 2]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row.update(
        warmup_s=warmup,
        sec_per_batch=sec,
        step_times_s=times,
        img_per_s=batch / sec,
        ms_per_img=1000 * sec / batch,
        peak_rss_mb=rss,
        # the memory the table reports: allocated GPU memory on CUDA, resident memory of the process on the CPU
        peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else rss,
        peak_mem_kind="cuda_max_allocated" if cuda else "ru_maxrss",
    )
    return row


def backend_label(row: dict) -> str:
    if row["backend"] is None:
        return "-"
    if row["backend"] == "auto":
        return f"auto (= {row['resolved_backend']})"
    return row["backend"]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    retain_freed_memory()  # as the mal command does (docs/BENCHMARKS.md)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="registered model names (default: vil_tiny vit_tiny)")
    p.add_argument("--images", nargs="+", type=int, help=f"resolutions in px (default: {' '.join(map(str, IMAGES))})")
    p.add_argument("--backends", nargs="+", help="mLSTM backends of the ViL models (default: parallel chunkwise auto)")
    p.add_argument("--recurrent", action="store_true", help="add the (very slow) recurrent backend")
    p.add_argument("--batch", type=int, help="default: 8 on the CPU, 256 on CUDA, 2 with --quick")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, help="default: 3 on the CPU, 10 on CUDA, 1 with --quick")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--ref-image", type=int, default=REF_IMAGE, help="resolution of the relative cost (default 224)")
    p.add_argument("--quick", action="store_true", help="smoke test: micro models, 64 and 128 px, batch 2, 1 rep")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: JSON case description
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.one:
        case = json.loads(args.one)
        print(json.dumps(run_case(**case)))
        return

    from mal.kernels import list_backends

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if args.quick:
        models, images, backends = ["vil_micro", "vit_micro"], [64, 128], ["parallel", "chunkwise"]
        batch, reps = 2, 1
    else:
        models, images = ["vil_tiny", "vit_tiny"], IMAGES
        backends = ["parallel", "chunkwise", "auto"]
        if cuda and "mlstm_kernels" in list_backends():
            backends.append("mlstm_kernels")
        batch, reps = (256, 10) if cuda else (8, 3)
    models = args.models or models
    images = sorted(args.images or images)
    backends = list(args.backends or backends)
    if args.recurrent and "recurrent" not in backends:
        backends.append("recurrent")
    batch = args.batch or batch
    reps = args.reps or reps

    cases = []
    for model in models:
        for backend in [None] if is_vit(model) else backends:
            cases += [dict(model_name=model, image=image, backend=backend) for image in images]

    rows = []
    for case in cases:
        row = run_in_child(__file__, args.threads, dict(batch=batch, reps=reps, device=device, amp=cuda, **case))
        rows.append(row)
        speed = "oom" if row["oom"] else f"{row['img_per_s']:8.2f} img/s {row['ms_per_img']:8.2f} ms/img"
        print(
            f"{row['model']:<10} {backend_label(row):<24} {row['image']:>4}px {row['tokens']:>5} tok "
            f"batch {row['batch']:<4} {speed} peak {fmt(row['peak_mem_mb'], '.0f')} MB",
            flush=True,
        )

    # cost per image relative to the same model + backend at the reference resolution
    ref_image = args.ref_image if args.ref_image in images else images[0]
    ref = {(r["model"], r["backend"]): r for r in rows if r["image"] == ref_image and not r["oom"]}
    for r in rows:
        base = ref.get((r["model"], r["backend"]))
        r["ref_image"] = ref_image
        r["cost_vs_ref"] = r["ms_per_img"] / base["ms_per_img"] if base and not r["oom"] else None

    lo, hi = SUMMARY_PAIR if set(SUMMARY_PAIR) <= set(images) else (images[0], images[-1])
    summary = []
    for model, backend in dict.fromkeys((r["model"], r["backend"]) for r in rows):
        pick = {r["image"]: r for r in rows if (r["model"], r["backend"]) == (model, backend)}
        a, b = pick.get(lo), pick.get(hi)
        ratio = b["ms_per_img"] / a["ms_per_img"] if a and b and not (a["oom"] or b["oom"]) else None
        token_ratio = b["tokens"] / a["tokens"] if a and b else None
        exponent = math.log(ratio) / math.log(token_ratio) if ratio and token_ratio and token_ratio != 1 else None
        summary.append(
            {
                "model": model,
                "backend": backend,
                "images": [lo, hi],
                "cost_ratio": ratio,
                "token_ratio": token_ratio,
                "token_exponent": exponent,
            }
        )

    mem = "peak GPU mem (allocated)" if cuda else "peak RSS"
    print(f"\n| model | backend | image | tokens | batch | img/s | ms/img | cost vs {ref_image} px | {mem} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        speed = "oom | oom" if r["oom"] else f"{r['img_per_s']:.2f} | {r['ms_per_img']:.2f}"
        print(
            f"| {r['model']} | {backend_label(r)} | {r['image']} | {r['tokens']} | {r['batch']} | {speed} | "
            f"{fmt(r['cost_vs_ref'], '.2f')} | {fmt(r['peak_mem_mb'], '.0f')} MB |"
        )
    print()
    for s in summary:
        label = s["model"] + ("" if s["backend"] is None else f" {s['backend']}")
        growth = (
            ""
            if s["token_exponent"] is None
            else (f" (tokens x{s['token_ratio']:.1f}; cost ~ tokens^{s['token_exponent']:.2f})")
        )
        print(f"{label}: cost({hi})/cost({lo}) = {fmt(s['cost_ratio'], '.2f')}{growth}")

    result = {
        "benchmark": "resolution_scaling",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
        },
        "settings": {
            "models": models,
            "images": images,
            "backends": backends,
            "batch": batch,
            "reps": reps,
            "dtype": "bfloat16 autocast" if cuda else "float32",
            "layout": "raster",
            "patch_size": PATCH,
            "ref_image": ref_image,
            "quick": args.quick,
        },
        "summary": summary,
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
