"""GPU checks and throughput: fixture parity on CUDA, mlstm_kernels vs our kernels, images/s at batch 256 in bf16.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--batch 256]

Needs CUDA (exits with a message otherwise). ``mlstm_kernels`` is optional: its rows are skipped when it is not
installed. Writes a JSON result (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from mal.io import write_json
from mal.kernels import cuda as mk
from mal.kernels import mlstm
from mal.models import create_encoder, vil_from_official

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "vil2_mini.safetensors"


def cuda_time(fn, reps: int = 10) -> float:
    """Median seconds of ``fn()`` on the GPU (CUDA events)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return sorted(times)[len(times) // 2]


def fixture_parity(backends: list[str]) -> dict:
    tensors = load_file(FIXTURE)
    state = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    out = {}
    for backend in backends:
        model = vil_from_official(state, image_size=32, patch_size=4, num_classes=10, backend=backend).cuda()
        with torch.no_grad():
            logits = model(tensors["input"].cuda()).cpu()
        out[backend] = float((logits - tensors["logits"]).abs().max())
    return out


def kernel_agreement(backends: list[str]) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for S in (64, 196, 576):
        for DH in (32, 96):
            q, k, v = (torch.randn(2, 4, S, DH, device="cuda", generator=g) for _ in range(3))
            i = torch.randn(2, 4, S, device="cuda", generator=g)
            f = 3 + torch.randn(2, 4, S, device="cuda", generator=g)
            ref = mlstm(q.double(), k.double(), v.double(), i.double(), f.double(), backend="parallel")
            for backend in backends:
                for dtype in (torch.float32, torch.bfloat16):
                    h = mlstm(q.to(dtype), k.to(dtype), v.to(dtype), i, f, backend=backend).double()
                    err = (h - ref).abs().max().item()
                    rows.append(
                        {
                            "S": S,
                            "DH": DH,
                            "backend": backend,
                            "dtype": str(dtype),
                            "max_abs_err": err,
                            "rel_err": err / ref.abs().max().item(),
                        }
                    )
    return rows


def throughput(backends: list[str], batch: int) -> list[dict]:
    rows = []
    cases = [("vil_tiny", 224, "finetune", {}), ("vil_tiny", 448, "finetune", {})]
    cases += [
        ("vil_tiny", 192, m, {"cluster_size": 4, "scan_schedule": "alternating"}) for m in ("finetune", "pretrain")
    ]
    for name, image, mode, kw in cases:
        for backend in backends:
            if mode == "pretrain" and backend == "mlstm_kernels":
                continue  # fused kernel has no cluster-causal form
            bs = batch if image <= 224 else batch // 4
            enc = create_encoder(name, image_size=image, backend=backend, **kw).cuda().eval()
            x = torch.randn(bs, 3, image, image, device="cuda")
            torch.cuda.reset_peak_memory_stats()

            def run(enc=enc, x=x, mode=mode):
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    enc(x, mode=mode)

            try:
                sec = cuda_time(run)
            except torch.OutOfMemoryError:
                rows.append({"model": name, "image": image, "mode": mode, "backend": backend, "oom": True})
                continue
            rows.append(
                {
                    "model": name,
                    "image": image,
                    "mode": mode,
                    "backend": backend,
                    "batch": bs,
                    "layout": "4x4 clusters" if kw else "raster",
                    "img_per_s": bs / sec,
                    "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            del enc, x
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    backends = ["parallel", "chunkwise"] + (["mlstm_kernels"] if mk.is_available() else [])
    t0 = time.time()
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "mlstm_kernels": mk.is_available(),
        "fixture_max_abs_err": fixture_parity(backends),
    }
    print(json.dumps(result), flush=True)
    result["kernel_agreement"] = kernel_agreement(backends)
    for r in result["kernel_agreement"]:
        print(json.dumps(r), flush=True)
    result["throughput_bf16"] = throughput(backends, args.batch)
    result["seconds"] = time.time() - t0
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
