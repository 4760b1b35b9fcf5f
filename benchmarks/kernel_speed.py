"""CPU speed of the mLSTM backends (median ms): forward only, plus forward+backward for parallel/chunkwise.

Run: ``.venv/bin/python benchmarks/kernel_speed.py``. Writes ``benchmarks/results/kernel_speed.json``.
Shapes: B=2, NH=4, DH=96, S in {64, 196, 256, 576, 1024}; the recurrent backend is skipped beyond S=256.
"Segmented" variants use 16-token segments (the last one may be shorter).
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from mal.io import write_json
from mal.kernels import BACKENDS, PARALLEL_MAX_LEN
from mal.runtime import retain_freed_memory

B, NH, DH = 2, 4, 96
LENGTHS = (64, 196, 256, 576, 1024)
RECURRENT_MAX = 256
SEGMENT = 16
CHUNK = 64
OUT = Path(__file__).resolve().parent / "results" / "kernel_speed.json"


def median_ms(fn, min_reps: int = 5, budget_s: float = 1.5) -> float:
    fn()  # warm-up (also fills the mask / layout caches)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd(fn, inputs, kw):
    def step():
        xs = [t.detach().requires_grad_() for t in inputs]
        fn(*xs, **kw).sum().backward()

    return step


def main() -> None:
    retain_freed_memory()  # as the mal command does (docs/BENCHMARKS.md)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows: list[dict] = []
    cols = ["parallel", "chunkwise", "recurrent", "parallel_seg16", "chunkwise_seg16"]
    train_cols = ["parallel", "chunkwise", "parallel_seg16", "chunkwise_seg16"]
    print(f"B={B} NH={NH} DH={DH} float32, forward only, median ms, threads={torch.get_num_threads()}")
    print(f"{'S':>6} " + " ".join(f"{c:>16}" for c in cols))
    with torch.no_grad():
        for S in LENGTHS:
            inputs = [torch.randn(B, NH, S, DH) for _ in range(3)]
            inputs += [torch.randn(B, NH, S), torch.randn(B, NH, S) + 3.0]
            seg = torch.arange(S) // SEGMENT
            row: dict = {"S": S}
            for col in cols:
                name, _, segmented = col.partition("_")
                if name == "recurrent" and S > RECURRENT_MAX:
                    row[col] = None
                    continue
                fn = BACKENDS[name]
                kw = {"segment_ids": seg if segmented else None, "chunk_size": CHUNK}
                row[col] = round(median_ms(lambda fn=fn, kw=kw, xs=inputs: fn(*xs, **kw)), 3)
            rows.append(row)
            cells = " ".join(f"{'-' if row[c] is None else format(row[c], '.2f'):>16}" for c in cols)
            print(f"{S:>6} {cells}")
    print("forward+backward (training), median ms")
    print(f"{'S':>6} " + " ".join(f"{c:>16}" for c in train_cols))
    train_rows: list[dict] = []
    for S in LENGTHS:
        inputs = [torch.randn(B, NH, S, DH) for _ in range(3)] + [torch.randn(B, NH, S), torch.randn(B, NH, S) + 3]
        seg = torch.arange(S) // SEGMENT
        row = {"S": S}
        for col in train_cols:
            name, _, segmented = col.partition("_")
            kw = {"segment_ids": seg if segmented else None, "chunk_size": CHUNK}
            row[col] = round(median_ms(fwd_bwd(BACKENDS[name], inputs, kw)), 3)
        train_rows.append(row)
        print(f"{S:>6} " + " ".join(f"{row[c]:>16.2f}" for c in train_cols))
    result = {
        "config": {"B": B, "NH": NH, "DH": DH, "dtype": "float32", "chunk_size": CHUNK, "segment": SEGMENT},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "PARALLEL_MAX_LEN": PARALLEL_MAX_LEN,
        "median_ms": rows,
        "median_ms_fwd_bwd": train_rows,
    }
    write_json(OUT, result)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
