"""``mal sweep``: config validation, the resolved plan of every shipped sweep, a smoke run of each, resumption."""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import pytest

from mal.cli import main
from mal.config import ConfigError, shipped_configs
from mal.models import create_encoder
from mal.runs import load_sweep_config, plan_sweep, run_sweep

SWEEPS = list(shipped_configs("sweeps"))


def test_the_paper_tables_are_shipped():
    assert set(SWEEPS) >= {"cluster_size", "scan_order", "masking", "decoder", "encoder_strategy", "multitask"}


@pytest.mark.parametrize("name", SWEEPS)
def test_every_run_of_a_shipped_sweep_resolves(name):
    """All configs of the full-size sweep are valid and every encoder builds (before hours of training)."""
    cfg = load_sweep_config(f"configs/sweeps/{name}.yaml")
    plan = plan_sweep(cfg)
    assert len(plan) == len(cfg.cells) * len(cfg.seeds)
    folders = set()
    for run in plan:
        for c in (run.stage1, run.pretrain, *run.evals.values()):
            if c is None:
                continue
            folders.add(c.run.out_dir)
            if c.model.name is not None:
                create_encoder(c.model.name, image_size=c.data.image_size, **c.model.overrides)
        for ev in run.evals.values():  # fine-tuning takes the model of its pretraining: its checkpoint's ...
            if run.pretrain is not None:
                assert ev.model.name is None and not ev.model.overrides
                assert ev.init.checkpoint == run.pretrain.run.out_dir
            else:  # ... or, from scratch, the one the cell would pretrain
                assert ev.init.checkpoint is None and ev.model.name is not None
    stage1 = {r.stage1.run.out_dir for r in plan if r.stage1 is not None}
    runs = sum((r.pretrain is not None) + len(r.evals) for r in plan)
    assert len(folders) == runs + len(stage1)  # no two runs share a folder (stage 1 is shared on purpose)


def test_table8_sweep_spends_one_label_budget(monkeypatch):
    """MAL-v1 Table 8 at the scenes' scale: stage 2 reads the dense labels of exactly the scenes whose image-level
    labels the classifier fine-tunes on (same fraction, same seed), and stage 1 sees every training scene."""
    import mal.pretrain.task as pretrain_task
    from mal.data import build_splits

    seen = {}

    class Stop(Exception):
        pass

    def capture(task, train_set, *args, **kwargs):
        seen["train"] = train_set
        raise Stop

    monkeypatch.setattr(pretrain_task, "Trainer", capture)
    plan = plan_sweep(load_sweep_config("configs/sweeps/multitask_classification.yaml", ["seeds=[1]"]))
    multitask = next(r for r in plan if r.name == "AR_+_depth_+_seg")
    multitask.pretrain.init.checkpoint = None  # stage 1 has not run
    with pytest.raises(Stop):
        pretrain_task.pretrain(multitask.pretrain)
    stage2 = seen["train"]
    ft = multitask.evals["ft"]
    labelled, _ = build_splits(ft.data, label_fraction=ft.data.label_fraction, seed=ft.run.seed)
    assert len(stage2) == len(labelled) == 500 and stage2.has_seg and stage2.has_depth
    assert labelled.num_classes == 4 and list(stage2.indices) == list(labelled.indices)
    with pytest.raises(Stop):
        pretrain_task.pretrain(multitask.stage1)
    assert len(seen["train"]) == 2000


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEPS)
def test_quick_sweep_runs_and_collects_every_cell(name, tmp_path):
    cfg = load_sweep_config(f"configs/sweeps/{name}.yaml", ["seeds=[0]", f"out_dir={tmp_path}", "share_runs=false"])
    result = run_sweep(cfg, quick=True, progress=False)
    metrics = [f"{e.name}.{m}" for e in cfg.evals for m in e.metrics]
    assert len(result["rows"]) == len(cfg.cells)
    for row in result["rows"]:
        assert all(math.isfinite(row[m]) for m in metrics)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["cell"] for r in rows] == [r["cell"] for r in result["rows"]]
    assert set(metrics) <= set(rows[0])
    md = (tmp_path / "results.md").read_text()
    assert all(a.name in md for a in cfg.axes) and md.count("\n|") == len(cfg.cells) + 2
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text())["quick"] is True


@pytest.mark.slow
def test_a_second_call_reuses_finished_runs_and_refuses_a_changed_config(tmp_path, capsys):
    args = ["sweep", "--config", "configs/sweeps/decoder.yaml", "--quick", "--no-progress", "seeds=[0]",
            f"out_dir={tmp_path}", "share_runs=false"]  # fmt: skip
    assert main(args) == 0
    summaries = sorted(tmp_path.glob("*/seed0/*/summary.json"))
    stamps = [p.stat().st_mtime_ns for p in summaries]
    assert len(summaries) == 8 * 3  # 8 cells x (pretrain + ft + probe)
    from mal.io import code_version

    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["command"] for r in rows} == {shlex.join(["mal", "sweep", "--config", args[2], "--quick", *args[5:]])}
    assert {r["code"] for r in rows} == {code_version()}  # the code that trained every run of the row
    assert all(json.loads(p.read_text())["code"] == code_version() for p in summaries)
    assert main(args) == 0  # everything reused: no summary rewritten
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    capsys.readouterr()
    # the same folder with another budget is refused, naming the key
    changed = "pretrain.overrides=[optim.epochs=8, run.image_every=null, run.eval_every=null, optim.min_lr=2e-5]"
    assert main([*args, changed]) == 2
    assert "optim.min_lr" in capsys.readouterr().err
    # a sweep folder moved elsewhere is the same sweep: every run is reused where it now is
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    tmp_path.rename(moved)
    assert main([*args[:-2], f"out_dir={moved}", "share_runs=false"]) == 0
    assert [p.stat().st_mtime_ns for p in sorted(moved.glob("*/seed0/*/summary.json"))] == stamps


@pytest.mark.slow
def test_only_trains_the_named_cells_and_merges_into_the_table(tmp_path, monkeypatch):
    trained = _count_training(monkeypatch)
    cells = ["depth_1_width_128", "depth_2_width_64"]
    cfg = load_sweep_config("configs/sweeps/decoder.yaml", ["seeds=[0]", f"out_dir={tmp_path / 'a'}", f"only={cells}"])
    assert [r.name for r in plan_sweep(cfg)] == cells
    first = run_sweep(cfg, quick=True, progress=False)
    assert [r["cell"] for r in first["table"]] == cells and len(trained) == 2 * 3
    # a later run of another cell, merged with the first one's rows: one table of the three cells
    other = load_sweep_config("configs/sweeps/decoder.yaml", ["seeds=[0]", f"out_dir={tmp_path / 'b'}",
                                                              "only=[depth_4_width_128]"])  # fmt: skip
    merged = run_sweep(other, quick=True, progress=False, merge=[tmp_path / "a" / "results.csv"])
    assert [r["cell"] for r in merged["table"]] == ["depth_1_width_128", "depth_4_width_128", "depth_2_width_64"]
    with pytest.raises(ValueError, match="only: no cell \\['depth_9'\\]; cells: depth_1_width_128, "):
        load_sweep_config("configs/sweeps/decoder.yaml", ["only=[depth_9]"])


def _count_training(monkeypatch) -> list[str]:
    """Record the output folder of every pretraining and fine-tuning run that actually trains."""
    import mal.runs

    trained: list[str] = []
    for module, name in ((mal.runs, "pretrain"), (mal.runs, "finetune")):
        train = getattr(module, name)

        def wrapped(cfg, *a, _train=train, **k):
            trained.append(str(cfg.run.out_dir))
            return _train(cfg, *a, **k)

        monkeypatch.setattr(module, name, wrapped)
    return trained


@pytest.mark.slow
def test_sweeps_share_finished_runs_with_the_same_config(tmp_path, monkeypatch):
    """A run that another sweep next to this one already trained with the same config (here: an override equal to
    the preset) is copied, not retrained; a fine-tuning run only when its checkpoint is the same run."""
    trained = _count_training(monkeypatch)
    one = "axes=[{name: a, values: [{label: base}]}]"
    first = load_sweep_config("configs/sweeps/decoder.yaml", ["seeds=[0]", f"out_dir={tmp_path / 'first'}", one])
    r1 = run_sweep(first, quick=True, progress=False)
    assert len(trained) == 3  # pretrain, ft, probe
    two = ("axes=[{name: b, values: [{label: same, set: [model.overrides.layout.cluster_size=2]}, "
           "{label: other, pretrain: [objective.decoder_depth=2]}]}]")  # fmt: skip
    second = load_sweep_config("configs/sweeps/decoder.yaml", ["seeds=[0]", f"out_dir={tmp_path / 'second'}", two])
    r2 = run_sweep(second, quick=True, progress=False)
    assert [Path(t).parts[-3:] for t in trained[3:]] == [("other", "seed0", s) for s in ("pretrain", "ft", "probe")]
    for stage in ("pretrain", "ft", "probe"):
        src, dst = tmp_path / "first/base/seed0" / stage, tmp_path / "second/same/seed0" / stage
        assert json.loads((dst / "summary.json").read_text())["reused_from"] == str(src)
        assert "reused_from" not in json.loads((src / "summary.json").read_text())  # the source is untouched
        assert str(dst) in (dst / "config.yaml").read_text() and str(dst) not in (src / "config.yaml").read_text()
    same = next(r for r in r2["rows"] if r["cell"] == "same")
    assert same["ft.top1"] == r1["rows"][0]["ft.top1"] and same["probe.top1"] == r1["rows"][0]["probe.top1"]
    # a third call reuses its own runs, and joins rows of an earlier results.csv: a seed measured before is added,
    # a (cell, seed) this call measures comes from this call, a cell the sweep no longer has is dropped
    earlier = tmp_path / "earlier.csv"
    earlier.write_text("cell,seed,b,pretrain_seconds,ft.top1,ft.seconds,probe.top1,probe.seconds\n"
                       "same,0,same,,1.0,,1.0,\nsame,5,same,,50.0,,40.0,\ngone,5,gone,,9.0,,9.0,\n")  # fmt: skip
    r3 = run_sweep(second, quick=True, progress=False, merge=[earlier])
    assert [(r["cell"], r["seed"]) for r in r3["rows"]] == [("same", 0), ("other", 0), ("same", 5)]
    assert r3["rows"][0]["ft.top1"] == same["ft.top1"] and r3["rows"][2]["ft.top1"] == 50.0
    assert r3["seeds"] == [0, 5] and r3["table"][0]["ft.top1_per_seed"] == [same["ft.top1"], 50.0]
    assert "| other (seeds 0) |" in (tmp_path / "second/results.md").read_text()  # fewer seeds than the table
    # with share_runs=false nothing is looked up
    off = load_sweep_config("configs/sweeps/decoder.yaml", ["seeds=[0]", f"out_dir={tmp_path / 'off'}", one,
                                                            "share_runs=false"])  # fmt: skip
    run_sweep(off, quick=True, progress=False)
    assert len(trained) == 6 + 3


def test_dry_run_lists_the_runs_without_training(tmp_path, capsys):
    assert main(["sweep", "--config", "configs/sweeps/encoder_strategy.yaml", "--dry-run", f"out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "12 cells x 3 seeds" in out and "ViT__MAE: vit_micro mae" in out and "ViL__none: no pretraining" in out
    assert "ARM__cluster: arm_micro ar" in out and "Vim__MAE: vim_micro mae" in out
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("axes=[]", "at least one axis"),
        ("seeds=[]", "at least one seed"),
        ("evals=[{name: a, metrics: [accuracy]}]", "unknown metric"),
        ("evals=[{name: pretrain}]", "distinct names"),
        ("axes=[{name: a, values: [{label: x}, {label: x}]}]", "repeats a label"),
        ("axes=[{name: a, values: [{label: 'x 1'}, {label: 'x/1'}]}]", "same folder name"),
        ("axes=[{name: a, values: [{label: x, reference: true}, {label: y, reference: true}]}]", "more than one"),
    ],
)
def test_bad_sweep_configs_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep_config("configs/sweeps/decoder.yaml", [override])


def test_a_bad_override_in_a_cell_fails_before_training(tmp_path):
    cfg = load_sweep_config(
        "configs/sweeps/decoder.yaml",
        [f"out_dir={tmp_path}", "axes=[{name: d, values: [{label: ok}, {label: bad, pretrain: [objective.depth=3]}]}]"],
    )
    with pytest.raises(ConfigError, match="objective.depth"):
        run_sweep(cfg, quick=True, progress=False)
    assert not any(tmp_path.iterdir())


def _results_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("cell,seed,order,pretrain_seconds,ft.top1,ft.seconds,probe.top1,probe.seconds\n" + "".join(
        f"{r}\n" for r in rows))  # fmt: skip
    return path


def test_a_report_from_earlier_results_trains_nothing(tmp_path, capsys):
    """``--merge`` + ``--report``: the table and plot of results measured at different times (e.g. the committed
    docs/results/<name>.csv), seconds unknown where the file has none."""
    a = _results_csv(
        tmp_path / "a.csv", ["random,0,random,100,80.0,10,70.0,5", "alternating,0,alternating,,84.0,,79.0,"]
    )
    b = _results_csv(tmp_path / "b.csv", ["random,1,random,,82.0,,72.0,", "random,2,random,,84.0,,74.0,"])
    out = tmp_path / "report"
    args = ["sweep", "--config", "configs/sweeps/scan_order.yaml", "--report", f"out_dir={out}"]
    assert main([*args, "--merge", str(a), "--merge", str(b)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["seeds"] == [0, 1, 2] and len(result["rows"]) == 4
    random = result["table"][0]
    assert random["ft.top1_per_seed"] == [80.0, 82.0, 84.0] and random["ft.top1_mean"] == pytest.approx(82.0)
    assert random["ft.top1_std"] == pytest.approx(2.0) and random["seconds"] == pytest.approx(115.0)
    md = (out / "results.md").read_text()
    assert "| random | 82.00 ± 2.00 | 72.00 ± 2.00 | 81.4 | 115s |" in md
    assert "| alternating (seeds 0) | 84.00 ± 0.00 | 79.00 ± 0.00 | 84.3 | - |" in md
    assert "| row, forward (seeds none) | nan" in md
    assert (out / "plot.png").stat().st_size > 1000
    assert not list(out.glob("*/seed*"))  # nothing trained


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "not found"),
        ("cell,order\nrandom,random\n", "no column.*seed"),
        ("cell,seed,ft.top1\nrandom,0,high\n", "line 2: ft.top1='high' is not a number"),
        ("cell,seed,ft.top1\nrandom,zero,80\n", "line 2: seed='zero' is not a number"),
    ],
)
def test_bad_results_to_merge_are_clear_errors(tmp_path, content, match):
    path = tmp_path / "r.csv"
    if content is not None:
        path.write_text(content)
    cfg = load_sweep_config("configs/sweeps/scan_order.yaml", [f"out_dir={tmp_path / 'out'}"])
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run_sweep(cfg, merge=[path], report_only=True)
    with pytest.raises(ValueError, match="needs results to merge"):
        run_sweep(cfg, report_only=True)


def test_the_plot_marks_the_reference_cell(tmp_path, monkeypatch):
    """The dashed line of every panel is at the mean of the cell marked ``reference``, else of the first cell."""
    import matplotlib.axes

    lines = []
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, y, **kw: lines.append(y))
    a = _results_csv(tmp_path / "a.csv", ["random,0,random,,80.0,,70.0,", "alternating,0,alternating,,84.0,,79.0,"])
    args = ["sweep", "--config", "scan_order", "--report", "--merge", str(a), f"out_dir={tmp_path / 'r'}"]
    assert main(args) == 0  # the shipped config marks its default, the alternating schedule
    assert lines == [84.0, 79.0]
    lines.clear()
    assert main([*args, "axes=[{name: order, values: [{label: random}, {label: alternating}]}]"]) == 0
    assert lines == [80.0, 70.0]  # none marked: the first cell
