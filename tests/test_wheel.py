"""Installable like a library: the wheel carries the configs, installs into a fresh virtual environment with the core
dependencies only, and runs there, outside the checkout; importing ``mal`` and ``mal.cli`` is cheap."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT


def test_importing_mal_and_its_cli_loads_no_optional_or_heavy_module():
    code = (
        "import sys, mal, mal.cli\n"
        "heavy = ['torch', 'torch._dynamo', 'h5py', 'scipy', 'tensorboard', 'onnx', 'triton']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    # the public API still works, loaded on first use
    code = "import mal, sys; mal.create_model('mal_micro'); print('h5py' in sys.modules, 'tensorboard' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **env}, timeout=1200)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_and_runs_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)], tmp_path)
    (wheel,) = dist.glob("mal_vision-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("mal/configs/pretrain/mal_micro_digits.yaml", "mal/configs/sweeps/demo.yaml",
                    "mal/configs/finetune/mal_micro_digits.yaml", "mal/configs/sweeps/_digits.yaml"):  # fmt: skip
        assert shipped in names
    assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    py, mal = venv / "bin" / "python", venv / "bin" / "mal"
    run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], tmp_path)  # the CPU build, as the Makefile does
    run([str(py), "-m", "pip", "install", "-q", str(wheel)], tmp_path)
    work = tmp_path / "elsewhere"  # no checkout here: the configs must come from the package
    work.mkdir()
    listed = run([str(mal), "configs"], work).stdout
    assert "mal_micro_digits" in listed and "demo" in listed
    assert run([str(mal), "--version"], work).stdout.startswith("mal ")
    run([str(mal), "pretrain", "--config", "mal_micro_digits", "optim.max_steps=2", "run.progress=false",
         "run.out_dir=pre"], work)  # fmt: skip
    assert (work / "pre" / "checkpoints" / "step_00000002" / "config.json").is_file()
    run([str(mal), "demo", "--quick", "--no-progress"], work)
    assert (work / "runs" / "demo" / "results.md").is_file()
    assert (work / "runs" / "demo" / "MAL" / "seed0" / "ft" / "summary.json").is_file()
    assert not (work / "runs" / "demo" / "plot.png").exists()  # no plots extra: figures skipped, the run goes on
    make_png = "from PIL import Image; Image.new('L', (32, 32), 200).save('seven.png')"
    run([str(py), "-c", make_png], work)
    ft = work / "runs" / "demo" / "MAL" / "seed0" / "ft"
    out = run([str(mal), "predict", "--checkpoint", str(ft), "seven.png", "--topk", "2", "--out", "p.csv"], work)
    rows = (work / "p.csv").read_text().splitlines()
    assert rows[0] == "path,rank,class,name,probability" and len(rows) == 3, out.stdout
    heavy = ("h5py", "tensorboard", "onnx", "sklearn", "scipy", "matplotlib")
    probe = f"import importlib.util as u; print([m for m in {heavy!r} if u.find_spec(m)])"
    assert run([str(py), "-c", probe], work).stdout.strip() == "[]"  # the core install is lean
