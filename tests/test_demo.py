"""``mal demo`` end to end at a smoke-test budget: the demos are shipped sweeps (``configs/sweeps/demo.yaml``,
``configs/sweeps/multitask.yaml``) run by the sweep runner: the table, the plot, reuse of finished runs."""

from __future__ import annotations

import json

import pytest

from mal.cli import main as cli_main

pytestmark = pytest.mark.slow


def test_quick_demo_writes_table_and_plot_and_reuses_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--quick", "--seeds", "2", "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [(r["cell"], r["seed"]) for r in result["rows"]] == [("MAL", 0), ("scratch", 0), ("MAL", 1), ("scratch", 1)]
    assert all(0 <= r["ft.top1"] <= 100 and 0 <= r["ft.ema_top1"] <= 100 for r in result["rows"])
    assert [r["method"] for r in result["table"]] == ["MAL", "scratch"]
    table = (out / "results.md").read_text()
    assert "| MAL |" in table and "| scratch |" in table and "± " in table
    assert (out / "plot.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "loaded" in printed and "left out" in printed  # the decoder is left out and reported
    # a second call reuses the finished runs: same numbers, no training
    stamp = (out / "MAL" / "seed0" / "ft" / "summary.json").stat().st_mtime_ns
    assert cli_main(["demo", "--out", str(out), "--quick", "--seeds", "2", "--no-progress"]) == 0
    assert (out / "MAL" / "seed0" / "ft" / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["rows"] == result["rows"]
    # a finished run is never reported for another config
    assert cli_main(["demo", "--out", str(out), "--quick", "--seeds", "2", "--labels", "0.2", "--no-progress"]) == 2
    assert "another config (data.label_fraction)" in capsys.readouterr().err


def test_quick_dense_demo_runs_all_three_initializations(tmp_path):
    out = tmp_path / "dense"
    assert cli_main(["demo", "--task", "dense", "--out", str(out), "--quick", "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["pretraining"] for r in result["rows"]] == ["none", "AR only", "AR + depth + seg"]
    for r in result["rows"]:
        assert 0 <= r["seg.miou"] <= 100 and 0 <= r["seg.pixel_acc"] <= 100
        assert r["depth.rmse"] > 0 and r["depth.abs_rel"] > 0
    assert json.loads((out / "stage1" / "seed0" / "summary.json").read_text())["finished"]
    table = (out / "results.md").read_text()
    assert "AR + depth + seg" in table and "seg.miou" in table
    assert (out / "plot.png").stat().st_size > 1000
