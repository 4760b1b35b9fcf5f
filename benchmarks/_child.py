"""Run one benchmark case in a fresh Python process, so that its peak resident memory (ru_maxrss) is its own.

The benchmark script re-invokes itself with ``--threads N --one '<case as JSON>'`` and prints the case's result
as JSON on its last stdout line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_in_child(script: str, threads: int, case: dict, env: dict[str, str] | None = None) -> dict:
    """Run ``script --threads threads --one json(case)`` (with ``env`` added to the environment) and return the JSON
    of its last stdout line; stop the benchmark with the child's stderr when the case fails."""
    cmd = [sys.executable, script, "--threads", str(threads), "--one", json.dumps(case)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=None if env is None else {**os.environ, **env})
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        raise SystemExit(f"case {case} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])
