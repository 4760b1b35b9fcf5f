"""Start-up time of the ``mal`` command: ``mal --help``, ``mal --version`` and ``import mal``, each in a fresh
process (median of ``--reps`` runs; the heavy imports happen only inside the commands that need them).

    python benchmarks/cli_startup.py [--reps 7] [--out benchmarks/results/cli_startup.json]

Prints a table and writes JSON. The goal is ``mal --help`` under 1.5 s on 2 CPU cores; the test suite checks what it
imports (tests/test_wheel.py), this script measures how long it takes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "mal --help": [sys.executable, "-m", "mal.cli", "--help"],
    "mal --version": [sys.executable, "-m", "mal.cli", "--version"],
    "import mal": [sys.executable, "-c", "import mal"],
    "python alone": [sys.executable, "-c", "pass"],
    "import torch (for scale)": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cli_startup.json"))
    parser.add_argument("--quick", action="store_true", help="2 repetitions (the smoke test)")
    args = parser.parse_args()
    reps = 2 if args.quick else args.reps
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    rows = []
    for name, cmd in CASES.items():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        rows.append({"case": name, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)})
    print(f"{'case':<26} {'median s':>9} {'min s':>7} {'max s':>7}   ({reps} runs each)")
    for r in rows:
        print(f"{r['case']:<26} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"reps": reps, "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
