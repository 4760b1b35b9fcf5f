"""The Mamba encoders (Vim, ARM's MambaMLP) against ViL and ViT on the CPU, paired in one process, and the
selective-scan backends at the encoders' shapes.

    python benchmarks/mamba_speed.py [--size tiny] [--batch 4] [--rounds 5] [--threads 2] [--quick]

1. ``scan``: forward + backward of ``mal.kernels.ssm.selective_scan`` per backend (``loop``, ``parallel``) at the
   shape of Vim-T's scans at 224 px (196 tokens, inner width 384, state 16) and of the micro models at 32 px: the
   measurement behind ``backend="auto"`` picking ``loop`` on the CPU.
2. ``encoders``: ``vil_<size>``, ``vit_<size>``, ``vim_<size>``, ``arm_<size>`` classifiers built once, then per
   round each at 224 and at 448 px, one after the other (forward without gradients, and forward + backward at
   224 px); per round the cost of each relative to ViL at the same size, so that the machine's drift cancels. The
   median and range over rounds are reported.

Writes ``benchmarks/results/mamba_speed.json`` (atomically) and prints tables. ``--quick``: micro models at 32 and
64 px, 2 rounds (a smoke test, no numbers to quote).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from mal.io import write_json

RESULTS = Path(__file__).parent / "results" / "mamba_speed.json"
FAMILIES = ("vil", "vit", "vim", "arm")


def _seconds(fn, reps: int) -> float:  # noqa: ANN001
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def scan_rows(shapes: list[tuple[int, int, int, int]], reps: int) -> list[dict]:
    from mal.kernels.ssm import selective_scan

    rows = []
    for Bn, S, I, N in shapes:
        g = torch.Generator().manual_seed(0)
        u, delta = torch.randn(Bn, S, I, generator=g), torch.rand(Bn, S, I, generator=g) * 0.1
        A, B, C = -torch.rand(I, N, generator=g) - 0.5, torch.randn(Bn, S, N, generator=g), torch.randn(Bn, S, N)
        for backend in ("loop", "parallel"):

            def step(backend: str = backend, args: tuple = (u, delta, A, B, C)) -> None:
                x = args[0].clone().requires_grad_()
                selective_scan(x, *args[1:], None, backend=backend).sum().backward()

            sec = _seconds(step, reps)
            rows.append({"shape": [Bn, S, I, N], "backend": backend, "ms_fwd_bwd": 1000 * sec})
    return rows


def encoder_rows(size: str, images: list[int], batch: int, rounds: int) -> dict:
    from mal.models import create_model

    models = {f: create_model(f"{f}_{size}", num_classes=1000).eval() for f in FAMILIES}
    params = {f: sum(p.numel() for p in m.parameters()) / 1e6 for f, m in models.items()}
    xs = {s: torch.randn(batch, 3, s, s) for s in images}
    costs: dict[str, list[dict]] = {}  # "<family>/<case>" -> per round
    for _ in range(rounds):
        for f, model in models.items():
            for s in images:
                with torch.no_grad():
                    sec = _seconds(lambda model=model, s=s: model(xs[s]), 1)
                costs.setdefault(f"{f}/{s}px", []).append(sec / batch)
            model.train()
            sec = _seconds(lambda model=model: model(xs[images[0]]).sum().backward(), 1)
            model.eval()
            model.zero_grad(set_to_none=True)
            costs.setdefault(f"{f}/{images[0]}px_fwd_bwd", []).append(sec / batch)
    cases = [f"{s}px" for s in images] + [f"{images[0]}px_fwd_bwd"]
    table = {}
    for f in FAMILIES:
        for case in cases:
            ratios = [a / b for a, b in zip(costs[f"{f}/{case}"], costs[f"vil/{case}"], strict=True)]
            table[f"{f}/{case}"] = {
                "ms_per_img_median": 1000 * statistics.median(costs[f"{f}/{case}"]),
                "cost_vs_vil_median": statistics.median(ratios),
                "cost_vs_vil_range": [min(ratios), max(ratios)],
            }
    return {"params_m": params, "cases": cases, "rows": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny", choices=["micro", "tiny", "small", "base"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    if args.quick:
        size, images, batch, rounds, shapes, reps = "micro", [32, 64], 2, 2, [(2, 64, 192, 16)], 1
    else:
        size, images, batch, rounds, reps = args.size, [224, 448], args.batch, args.rounds, 3
        shapes = [(8, 196, 384, 16), (64, 64, 192, 16)]  # Vim-T at 224 px; the micro models at 32 px
    scans = scan_rows(shapes, reps)
    print("selective scan, forward + backward (ms):")
    for r in scans:
        print(f"  B, S, I, N = {r['shape']}  {r['backend']:<9} {r['ms_fwd_bwd']:9.1f}")
    enc = encoder_rows(size, images, batch, rounds)
    print(f"\nencoders ({size}, batch {batch}, {rounds} rounds): ms per image, median; cost relative to ViL per round")
    print("| model | params (M) | " + " | ".join(enc["cases"]) + " |")
    print("| --- | --- |" + " --- |" * len(enc["cases"]))
    for f in FAMILIES:
        cells = []
        for case in enc["cases"]:
            r = enc["rows"][f"{f}/{case}"]
            lo, hi = r["cost_vs_vil_range"]
            cells.append(f"{r['ms_per_img_median']:.1f} ({r['cost_vs_vil_median']:.2f}x, {lo:.2f}-{hi:.2f})")
        print(f"| {f}_{size} | {enc['params_m'][f]:.1f} | " + " | ".join(cells) + " |")
    result = {
        "benchmark": "mamba_speed",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "settings": {"size": size, "images": images, "batch": batch, "rounds": rounds, "quick": args.quick},
        "scan": scans,
        "encoders": enc,
        "seconds": time.time() - t0,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
