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
    assert "loaded" in printed and "left out" in printed  # the decoder is left out and reported
    # a second call reuses the finished runs: same numbers, no training
    stamp = (out / "seed0" / "mal" / "summary.json").stat().st_mtime_ns
    assert cli_main(["demo", "--out", str(out), "--quick", "--seeds", "2", "--no-progress"]) == 0
    assert (out / "seed0" / "mal" / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["runs"] == result["runs"]
    # a finished run is never reported for another config
    assert cli_main(["demo", "--out", str(out), "--quick", "--seeds", "2", "--labels", "0.2", "--no-progress"]) == 2
    assert "another config (data.label_fraction)" in capsys.readouterr().err


def test_quick_dense_demo_runs_all_three_initializations(tmp_path):
    out = tmp_path / "dense"
    assert cli_main(["demo", "--task", "dense", "--out", str(out), "--quick", "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    runs = {(r["task"], r["init"]) for r in result["runs"]}
    assert runs == {(t, i) for t in ("segmentation", "depth") for i in ("scratch", "ar", "mt")}
    for r in result["runs"]:
        if r["task"] == "segmentation":
            assert 0 <= r["miou"] <= 100 and 0 <= r["pixel_acc"] <= 100
        else:
            assert r["rmse"] > 0 and r["abs_rel"] > 0
    # stage 2 of both kinds starts from stage 1, and the same number of steps
    for name in ("stage2_mt", "stage2_ar"):
        summary = json.loads((out / "seed0" / name / "summary.json").read_text())
        assert summary["finished"]
    table = (out / "results.md").read_text()
    assert "AR + multi-task pretraining" in table and "mIoU" in table
    assert (out / "plots" / "curves.png").stat().st_size > 1000
