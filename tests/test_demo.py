"""``mal demo`` end to end at a smoke-test budget: the table, the plots, and reuse of finished runs."""

from __future__ import annotations

import json

from mal.cli import main as cli_main


def test_quick_demo_writes_table_and_plots_and_reuses_runs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--quick", "--seeds", "2", "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in result["runs"]] == ["mal", "scratch", "mal", "scratch"]
    assert all(0 <= r["top1"] <= 100 and r["labels"] == 126 for r in result["runs"])
    table = (out / "results.md").read_text()
    assert "MAL pretrain + fine-tune" in table and "from scratch" in table and "± " in table
    for name in ("loss_curves.png", "accuracy.png", "reconstructions.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "loaded" in printed and "dropped" in printed  # the decoder is dropped and reported
    # a second call reuses the finished runs: same numbers, no training
    stamp = (out / "seed0" / "mal" / "summary.json").stat().st_mtime_ns
    assert cli_main(["demo", "--out", str(out), "--quick", "--seeds", "2", "--no-progress"]) == 0
    assert (out / "seed0" / "mal" / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["runs"] == result["runs"]
