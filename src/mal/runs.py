"""Run orchestration, the one home of ``mal sweep`` and ``mal demo``: a grid of pretraining + fine-tuning runs (the
paper's ablation tables, and the two demos, at any scale), resumable, with budgets, seeds, mean and spread over
seeds, a report (``results.csv`` / ``results.md`` / ``results.json``) and a plot. The demos are sweeps shipped as
configs: ``configs/sweeps/demo.yaml`` (digits, MAL vs scratch) and ``configs/sweeps/multitask.yaml`` (the dense
demo).

A sweep is the product of its ``axes`` (each value a label plus config overrides) times its ``seeds``. Every cell
runs, per seed:

1. the shared ``stage1`` pretraining (optional; one per seed, the initialization of every cell's pretraining);
2. the cell's pretraining (``pretrain_config`` + the sweep's and the cell's overrides), unless a value sets
   ``pretrain: null`` (no pretraining: the supervised baseline fine-tunes from scratch);
3. every fine-tuning evaluation of ``evals`` from that checkpoint, then its test metrics.

Finished runs are reused (a finished run with another config is an error), interrupted ones resumed, so running
the same command again only adds what is missing. Layout: ``<out_dir>/<cell>/seed<S>/{pretrain,<eval>}``.

Sweeps share runs (``share_runs``): before training a run, the sweep looks for a finished run with the same config
in the sweep folders next to its own (``runs/sweeps/*``: the k = 2 cell of ``cluster_size`` is the ``alternating``
cell of ``scan_order``) and copies it instead (hard links, so no space is spent), recording ``reused_from`` in its
``summary.json``. A fine-tuning run counts as the same only when its checkpoint comes from the same original run.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mal.config import apply_overrides, config_changes, config_yaml, find_config, load_config, load_yaml, to_dict
from mal.data import build_dataset, heldout_split
from mal.engine import latest_checkpoint
from mal.engine.settings import RESULT_FREE, result_changes
from mal.finetune import finetune, load_classifier, load_dense_model, load_detector, load_finetune_config
from mal.io import LOCK_NAME, STEP_DIR, atomic_write, locked_folder, pyplot, write_json
from mal.models.registry import expand_model_section
from mal.pretrain.task import load_pretrain_config, pretrain
from mal.tasks.classification import evaluate_classifier
from mal.tasks.dense import evaluate_dense
from mal.tasks.detection import COCO_STATS, evaluate_detector, iter_batches

# a smoke-test budget (tests, --quick): a tiny model for a few steps (fine-tuning takes the pretrained model's size)
QUICK_SIZE = ["data.image_size=16", "data.load_size=16"]
QUICK_PRE = ["model.overrides.dim=32", "model.overrides.depth=1", "model.overrides.num_heads=2", *QUICK_SIZE,
             "model.overrides.layout.cluster_size=2", "objective.decoder_dim=16", "objective.decoder_depth=1",
             "objective.decoder_heads=2", "optim.max_steps=4", "optim.batch_size=32", "run.eval_every=null",
             "run.image_every=null"]  # fmt: skip
QUICK_FT = [*QUICK_SIZE, "optim.max_steps=4", "optim.batch_size=16", "run.eval_every=2"]


def same_model(pretrain_cfg) -> str:  # noqa: ANN001
    """The override that gives a fine-tuning run the model (name, overrides, layout) of a pretraining config: what a
    from-scratch baseline trains, since without a checkpoint it has no weights to take them from."""
    return "model=" + json.dumps(to_dict(pretrain_cfg.model))


def resume_plan(path: str | Path, kind: str, overrides: list[str]) -> tuple[Path, list[str], list[str]]:
    """How ``mal pretrain|finetune --resume PATH [key=value ...]`` continues a run as people type it: the config file
    to load (the run's own ``config.yaml``, or a checkpoint's) and the overrides on top of it: the run continues in
    its folder (``run.out_dir=RUN`` unless an override sets it), and a run moved as a whole finds the runs its
    ``init.checkpoint`` named where they moved with it. Returns ``(config file, overrides, notes)``: ``notes`` says
    what was adjusted for a move. ``kind`` is ``pretrain`` or ``finetune``; resuming the other kind's run is a
    ``ValueError`` that says which command continues it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such run or checkpoint folder")
    if STEP_DIR.match(path.name) and path.parent.name == "checkpoints":
        run_dir, saved = path.parent.parent, path / "config.yaml"
    else:
        run_dir = path.parent if path.name == "checkpoints" else path
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            latest = latest_checkpoint(run_dir / "checkpoints")
            saved = latest / "config.yaml" if latest is not None else saved
    if not saved.is_file():
        raise FileNotFoundError(f"--resume {path}: not a run folder (no config.yaml); pass --config too")
    data = yaml.safe_load(saved.read_text()) or {}
    theirs = "pretrain" if "objective" in data else "finetune"
    if theirs != kind:
        raise ValueError(f"{run_dir} is a {theirs} run: continue it with mal {theirs} --resume {path}")
    extra = [] if any(o.split("=", 1)[0].strip() == "run.out_dir" for o in overrides) else [f"run.out_dir={run_dir}"]
    notes = []
    old_dir = (data.get("run") or {}).get("out_dir")
    source = (data.get("init") or {}).get("checkpoint")
    if old_dir and source and not Path(source).exists():  # moved: the source moved along when it was beside the run
        moved = os.path.normpath(run_dir / os.path.relpath(os.path.abspath(source), os.path.abspath(old_dir)))
        if Path(moved).exists():
            extra.append(f"init.checkpoint={moved}")
            notes.append(f"the run moved from {old_dir}: init.checkpoint {source} is now {moved}")
    return saved, [*extra, *overrides], notes


def run_or_reuse(train, cfg, out_dir: Path):
    """Train unless ``out_dir`` holds a finished run; resume an interrupted one. Returns its summary. A finished run
    trained with another config is an error (its numbers would be reported as this config's)."""
    summary = out_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("finished"):
        changed = result_changes(out_dir / "config.yaml", cfg, expand=expand_model_section)
        if changed:
            raise ValueError(
                f"{out_dir} holds a finished run with another config ({', '.join(changed)}); remove it or pass "
                "another --out"
            )
        return json.loads(summary.read_text())
    resume = "auto" if latest_checkpoint(out_dir / "checkpoints") is not None else None
    train(cfg, resume=resume)
    return json.loads(summary.read_text())


def heldout_accuracy(run_dir: Path, test_set) -> dict[str, float]:
    """Top-1 on the test split of the final weights and of their EMA."""
    model, cfg = load_classifier(run_dir)
    size = {"image_size": cfg.data.image_size, "eval_crop": cfg.data.eval_crop}
    out = {"top1": evaluate_classifier(model, test_set, **size)["top1"]}
    if cfg.recipe.ema_decay is not None:
        model, _ = load_classifier(run_dir, ema=True)
        out["ema_top1"] = evaluate_classifier(model, test_set, **size)["top1"]
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


_COCO_METRICS = {f"{p}{s}_{k}": True for p in ("", "ema_") for s in COCO_STATS for k in ("box", "mask")}
HIGHER_IS_BETTER = {"top1": True, "ema_top1": True, "miou": True, "pixel_acc": True, "delta1": True,
                    "rmse": False, "abs_rel": False, "dsc": True, "hd95": False, "ema_dsc": True, "ema_hd95": False,
                    **_COCO_METRICS}  # fmt: skip


@dataclass
class SweepValue:
    """One value of an axis. ``set``: the cell's model and layout (overrides of its pretraining; every fine-tuning
    takes the pretrained model from the checkpoint, and a cell without pretraining trains the same model from
    scratch); ``pretrain`` / ``finetune``: overrides of one stage; ``pretrain: null`` skips pretraining
    (fine-tuning from scratch); ``paper``: the paper's number for this setting (the report); ``reference``: this is
    the axis's default setting, which the plot marks with a dashed line (default: the axis's first value)."""

    label: str
    set: list[str] = field(default_factory=list)
    pretrain: list[str] | None = field(default_factory=list)
    finetune: list[str] = field(default_factory=list)
    paper: str | None = None
    reference: bool = False


@dataclass
class SweepAxis:
    name: str
    values: list[SweepValue] = field(default_factory=list)

    def validate(self) -> None:
        if not self.values:
            raise ValueError(f"axis {self.name!r} has no values")
        labels = [v.label for v in self.values]
        if len(set(labels)) != len(labels):
            raise ValueError(f"axis {self.name!r} repeats a label: {labels}")
        refs = [v.label for v in self.values if v.reference]
        if len(refs) > 1:
            raise ValueError(f"axis {self.name!r} marks more than one reference value: {refs}")

    @property
    def reference(self) -> SweepValue:
        """The value marked ``reference``, else the first."""
        return next((v for v in self.values if v.reference), self.values[0])


@dataclass
class StageSettings:
    """A training config file and overrides on top of it."""

    config: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class EvalSettings:
    """A fine-tuning evaluation: ``config`` (its ``task`` says classification, segmentation or depth) plus
    ``overrides``, and the test metrics reported (``top1``, ``ema_top1``; ``miou``, ``pixel_acc``; ``rmse``,
    ``abs_rel``, ``delta1``)."""

    name: str = "cls"
    config: str = "configs/finetune/mal_micro_digits.yaml"
    overrides: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: ["top1"])

    def validate(self) -> None:
        unknown = [m for m in self.metrics if m not in HIGHER_IS_BETTER]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(HIGHER_IS_BETTER)}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ValueError(f"eval name {self.name!r} must be a plain folder name")


@dataclass
class QuickSettings:
    """The smoke-test budget of ``mal sweep --quick`` (the test suite runs every shipped sweep with it): overrides
    applied right after each stage's config file, before the cells' overrides."""

    pretrain: list[str] = field(default_factory=lambda: list(QUICK_PRE))
    finetune: list[str] = field(default_factory=lambda: list(QUICK_FT))


@dataclass
class SweepConfig:
    name: str = "sweep"
    title: str = ""
    notes: str = ""  # what the table shows (and what the paper found), copied into results.md
    pretrain: StageSettings = field(
        default_factory=lambda: StageSettings(config="configs/pretrain/mal_micro_digits.yaml")
    )
    stage1: StageSettings | None = None
    evals: list[EvalSettings] = field(default_factory=lambda: [EvalSettings()])
    axes: list[SweepAxis] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out_dir: str | None = None  # default runs/sweeps/<name>
    share_runs: bool = True  # copy finished runs with the same config from sibling sweep folders instead of training
    quick: QuickSettings = field(default_factory=QuickSettings)
    # train only these cells (folder names, as `mal sweep --dry-run` lists them); the table then has the cells with
    # rows, those of --merge files included
    only: list[str] | None = None

    def validate(self) -> None:
        if not self.axes:
            raise ValueError("a sweep needs at least one axis")
        if not self.seeds:
            raise ValueError("a sweep needs at least one seed")
        names = [e.name for e in self.evals]
        if not names or len(set(names)) != len(names) or "pretrain" in names or "stage1" in names:
            raise ValueError(f"evals need distinct names other than pretrain/stage1, got {names}")
        folders = [cell_name(c) for c in self.cells]
        clash = sorted({f for f in folders if folders.count(f) > 1})
        if clash:
            raise ValueError(f"labels of different cells give the same folder name {clash}; make them differ")
        unknown = sorted(set(self.only or ()) - set(folders))
        if unknown or self.only == []:
            raise ValueError(f"only: no cell {unknown or '(an empty list)'}; cells: {', '.join(folders)}")

    @property
    def trained_cells(self) -> list[tuple[SweepValue, ...]]:
        """The cells a run trains: every cell, or those named by ``only``."""
        return [c for c in self.cells if self.only is None or cell_name(c) in self.only]

    @property
    def reference_cell(self) -> str:
        """The folder name of the reference cell: every axis at its reference value (the plot's dashed line)."""
        return cell_name(tuple(a.reference for a in self.axes))

    @property
    def cells(self) -> list[tuple[SweepValue, ...]]:
        """Every combination of axis values, in axis order."""
        return list(itertools.product(*(a.values for a in self.axes)))


def load_sweep_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    return load_config(SweepConfig, path, overrides, kind="sweeps")


def cell_name(cell: tuple[SweepValue, ...]) -> str:
    """A folder name for a cell, from its labels."""
    return "__".join(re.sub(r"[^A-Za-z0-9.=+-]+", "_", v.label).strip("_") for v in cell)


def cell_labels(cfg: SweepConfig, cell: tuple[SweepValue, ...]) -> dict[str, str]:
    """``{axis name: value label}`` of a cell."""
    return {a.name: v.label for a, v in zip(cfg.axes, cell, strict=True)}


@dataclass
class CellRun:
    """The resolved runs of one cell and seed: the stage-1 and own pretraining configs (None when skipped) and one
    fine-tuning config per eval; every config's ``run.out_dir`` is its folder."""

    cell: tuple[SweepValue, ...]
    seed: int
    stage1: Any = None
    pretrain: Any = None
    evals: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return cell_name(self.cell)


def plan_sweep(cfg: SweepConfig, *, quick: bool = False, progress: bool = True) -> list[CellRun]:
    """Every run of the sweep with its config resolved and validated, before anything trains (a typo in the last
    cell fails now, not after hours)."""
    out = sweep_dir(cfg)
    common = [f"run.progress={str(progress).lower()}", "run.tensorboard=false"]
    q_pre, q_ft = (cfg.quick.pretrain, cfg.quick.finetune) if quick else ([], [])
    plan = []
    for seed in cfg.seeds:
        sd = [*common, f"run.seed={seed}"]
        stage1_dir = out / "stage1" / f"seed{seed}"
        for cell in cfg.trained_cells:
            run = CellRun(cell, seed)
            base = out / run.name / f"seed{seed}"
            skip_pre = any(v.pretrain is None for v in cell)
            both = [o for v in cell for o in v.set]
            pre_dir = base / "pretrain"
            if not skip_pre:
                init: list[str] = []
                if cfg.stage1 is not None:
                    run.stage1 = load_pretrain_config(
                        cfg.stage1.config,
                        [*cfg.stage1.overrides, *q_pre, *both, *sd, f"run.out_dir={stage1_dir}"],
                    )
                    init = [f"init.checkpoint={stage1_dir}"]
                own = [o for v in cell for o in (v.pretrain or [])]
                run.pretrain = load_pretrain_config(
                    cfg.pretrain.config,
                    [*cfg.pretrain.overrides, *q_pre, *init, *both, *own, *sd, f"run.out_dir={pre_dir}"],
                )
            # the model the cell pretrains: fine-tuning takes it from the checkpoint, a cell without pretraining
            # trains the same model from scratch
            model = run.pretrain or load_pretrain_config(
                cfg.pretrain.config, [*cfg.pretrain.overrides, *q_pre, *both, *sd]
            )
            for ev in cfg.evals:
                own = [o for v in cell for o in v.finetune]
                over = [*ev.overrides, *q_ft, *own]
                ft_yaml = load_yaml(find_config(ev.config, "finetune"))
                mode = apply_overrides(ft_yaml, over).get("init", {}).get("mode", "finetune")
                if skip_pre:  # fine-tuning from scratch; a probe reads the random encoder
                    scratch = ["init.mode=scratch"] if mode != "linear_probe" else []
                    src = ["init.checkpoint=null", *scratch, same_model(model)]
                else:
                    src = [f"init.checkpoint={pre_dir}", *(["init.mode=finetune"] if mode == "scratch" else [])]
                run.evals[ev.name] = load_finetune_config(
                    ev.config, [*over, *src, *sd, f"run.out_dir={base / ev.name}"]
                )
            plan.append(run)
    return plan


#: The procedural instance splits the detection demo writes as COCO files: COCO split <- instances split
DEMO_COCO_SPLITS = {"train": "train", "val": "test"}


def write_demo_coco(root: str | Path, *, num_samples: int | None = None) -> Path:
    """The procedural instances as COCO files under ``root`` (``train2017``: the training scenes, ``val2017``: the
    test scenes, :data:`DEMO_COCO_SPLITS`), written once: a split whose annotation file exists is kept (the files
    are written before their JSON, so an existing JSON means a complete split). ``num_samples`` per split (None:
    the generator's). Returns ``root``."""
    from mal.data import ProceduralInstancesDataset, write_coco

    root = Path(root)
    for coco_split, split in DEMO_COCO_SPLITS.items():
        if not (root / "annotations" / f"instances_{coco_split}2017.json").is_file():
            write_coco(ProceduralInstancesDataset(split, num_samples=num_samples), root, coco_split)
    return root


def sweep_dir(cfg: SweepConfig) -> Path:
    return Path(cfg.out_dir or f"runs/sweeps/{cfg.name}")


def _origin(run_dir: str | Path) -> Path:
    """The folder where a run was trained: ``run_dir`` itself, or the source of a copy (``reused_from``)."""
    path = Path(run_dir).resolve()
    seen = set()
    while path not in seen:
        seen.add(path)
        summary = path / "summary.json"
        src = json.loads(summary.read_text()).get("reused_from") if summary.is_file() else None
        if not src:
            break
        path = Path(src).resolve()
    return path


def find_twin(cfg, root: Path) -> Path | None:  # noqa: ANN001
    """A finished run in a sweep folder under ``root`` that trained what ``cfg`` would: the same config apart from
    its output folder and the keys that do not change results (``config_changes``: models compared as built), and
    an ``init.checkpoint`` that is the same original run (or none for both). None when there is no such run."""
    out = Path(cfg.run.out_dir).resolve()
    ours = getattr(getattr(cfg, "init", None), "checkpoint", None)
    runs = {*root.glob("*/*/seed*/*/summary.json"), *root.glob("*/stage1/seed*/summary.json")}
    for summary in sorted(runs):
        run = summary.parent
        saved = run / "config.yaml"
        if run.resolve() == out or not saved.is_file() or not json.loads(summary.read_text()).get("finished"):
            continue
        ignore = ("run.out_dir", "init.checkpoint")
        if config_changes(saved, cfg, ignore=ignore, free=RESULT_FREE, expand=expand_model_section):
            continue
        theirs = (yaml.safe_load(saved.read_text()).get("init") or {}).get("checkpoint")
        if (ours is None) != (theirs is None) or (ours is not None and _origin(ours) != _origin(theirs)):
            continue
        return run
    return None


def _link_or_copy(src: str, dst: str) -> None:
    try:  # finished runs are never written again (and files are replaced, not edited): links are safe
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_run(src: Path, dst: Path, cfg) -> None:  # noqa: ANN001
    """Make ``dst`` a finished run with ``cfg`` from the finished run ``src`` that trained the same thing (its
    weights, metrics and images); ``dst`` must not exist. Written to a temporary folder, then renamed."""
    tmp = dst.with_name(f".{dst.name}.copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(LOCK_NAME))
    text = config_yaml(cfg)
    atomic_write(tmp / "config.yaml", lambda f: f.write(text))
    summary = json.loads((tmp / "summary.json").read_text())
    write_json(tmp / "summary.json", {**summary, "reused_from": str(src)})
    tmp.rename(dst)


def run_shared(train, cfg, root: Path | None) -> dict[str, Any]:  # noqa: ANN001
    """``run_or_reuse``, but a run not started yet is first looked for under ``root`` (see ``find_twin``)."""
    out = Path(cfg.run.out_dir)
    if root is not None and not out.exists():
        twin = find_twin(cfg, root)
        if twin is not None:
            print(f"  the same run is finished in {twin}: reusing it")
            copy_run(twin, out, cfg)
    return run_or_reuse(train, cfg, out)


def run_sweep(
    cfg: SweepConfig,
    *,
    quick: bool = False,
    progress: bool = True,
    dry_run: bool = False,
    merge: list[str | Path] | tuple[str | Path, ...] = (),
    report_only: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or complete) the sweep; returns ``{"rows": [...], "table": [...]}`` and writes ``results.csv``,
    ``results.md``, ``results.json`` and ``plot.png`` into the sweep folder. ``quick``: the sweep's smoke budget
    (``cfg.quick``) for every run; ``dry_run``: resolve and list the runs, train nothing. ``merge``: earlier
    ``results.csv`` files (e.g. ``docs/results/<name>.csv``) whose rows join this run's, so that seeds measured at
    different times form one table; a (cell, seed) this run measures comes from this run. ``report_only``: train
    nothing, the report comes from the ``merge`` files alone. ``command``: the command line that reproduces the
    rows (default ``mal sweep --config <name>``), written with each row measured now, beside the ``code`` its runs
    trained with (their ``summary.json``; ``unrecorded`` for runs older than that record)."""
    out = sweep_dir(cfg)
    earlier = [row for path in merge for row in read_results(cfg, path)]
    if report_only:
        if not earlier:
            raise ValueError("a report without training needs results to merge (--merge docs/results/<name>.csv)")
        return write_report(cfg, merge_rows(cfg, earlier, []), out, quick=quick)
    plan = plan_sweep(cfg, quick=quick, progress=progress)
    print(f"sweep {cfg.name}: {len(cfg.trained_cells)} cells x {len(cfg.seeds)} seeds -> {out}/")
    if dry_run:
        for run in plan:
            what = (
                "no pretraining"
                if run.pretrain is None
                else f"{run.pretrain.model.name} {run.pretrain.objective.method}"
            )
            print(f"  seed {run.seed} {run.name}: {what}; evals: {', '.join(run.evals)}")
        return {"rows": [], "table": []}
    t_all = time.perf_counter()
    with locked_folder(out, what="sweep"):  # one sweep per folder: two would train the same runs
        rows = _run_plan(cfg, plan, quick=quick)
    for row in rows:
        row["command"] = command or f"mal sweep --config {cfg.name}"
    result = write_report(cfg, merge_rows(cfg, earlier, rows), out, quick=quick)
    print(f"sweep {cfg.name} finished in {time.perf_counter() - t_all:.0f}s; results in {out}/")
    return result


def _run_plan(cfg: SweepConfig, plan: list[CellRun], *, quick: bool) -> list[dict[str, Any]]:
    """Train (or reuse) every run of ``plan`` and measure its test metrics: one row per cell and seed."""
    share = sweep_dir(cfg).parent if cfg.share_runs else None
    rows: list[dict[str, Any]] = []
    test_sets: dict[tuple, Any] = {}
    for run in plan:
        tag = f"[seed {run.seed}] {run.name}"
        summaries = []
        if run.stage1 is not None:
            print(f"{tag}: stage 1 pretraining -> {run.stage1.run.out_dir}")
            summaries.append(run_shared(pretrain, run.stage1, share))
        if run.pretrain is not None:
            print(f"{tag}: pretraining ({run.pretrain.model.name}, {run.pretrain.objective.method})")
            summaries.append(run_shared(pretrain, run.pretrain, share))
        pre_s = sum(summary["seconds"] for summary in summaries)
        row: dict[str, Any] = {"cell": run.name, "seed": run.seed, **cell_labels(cfg, run.cell)}
        row["pretrain_seconds"] = round(pre_s, 1)
        codes = [summary.get("code", "unrecorded") for summary in summaries]
        for ev in cfg.evals:
            fcfg = run.evals[ev.name]
            run_dir = Path(fcfg.run.out_dir)
            print(f"{tag}: fine-tuning {ev.name} ({fcfg.task}, {fcfg.init.mode})")
            ft = run_shared(finetune, fcfg, share)
            key = (fcfg.data.name, fcfg.data.load_size, fcfg.data.root, json.dumps(fcfg.data.options, sort_keys=True))
            if key not in test_sets:
                extra = {"num_samples": 32} if quick and fcfg.data.name in ("scenes", "instances") else {}
                test_sets[key] = build_dataset(
                    fcfg.data.name,
                    heldout_split(fcfg.data.name),
                    root=fcfg.data.root,
                    load_size=fcfg.data.load_size,
                    **{**fcfg.data.options, **extra},
                )
            metrics = _test_metrics(run_dir, fcfg, test_sets[key])
            for m in ev.metrics:
                row[f"{ev.name}.{m}"] = metrics[m]
            row[f"{ev.name}.seconds"] = round(ft["seconds"], 1)
            codes.append(ft.get("code", "unrecorded"))
            print(f"{tag} {ev.name}: test " + ", ".join(f"{m} {metrics[m]:.3f}" for m in ev.metrics))
        row["code"] = " ".join(dict.fromkeys(codes))  # pretraining first, then each evaluation, each once
        rows.append(row)
    return rows


def write_report(cfg: SweepConfig, rows: list[dict], out: Path, *, quick: bool = False) -> dict[str, Any]:
    """Write ``results.{json,csv,md}`` and ``plot.png`` of ``rows`` (one per cell and seed) into ``out``."""
    table = summarize(cfg, rows)
    seeds = sorted({r["seed"] for r in rows})
    result = {"name": cfg.name, "title": cfg.title, "seeds": seeds, "rows": rows, "table": table,
              "quick": bool(quick)}  # fmt: skip
    write_json(out / "results.json", result)
    atomic_write(out / "results.csv", lambda f: f.write(_csv(rows)))
    md = markdown(cfg, table)
    atomic_write(out / "results.md", lambda f: f.write(md))
    plot(cfg, rows, table, out / "plot.png")
    print(md)
    return result


def read_results(cfg: SweepConfig, path: str | Path) -> list[dict[str, Any]]:
    """The rows of an earlier ``results.csv`` of this sweep, with numbers parsed (an empty field: None). Rows of
    cells the sweep no longer has are dropped with a message; a file without the sweep's columns is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file to merge not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"cell", "seed"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} is not a sweep's results.csv: no column(s) {sorted(missing)}")
        raw = list(reader)
    labels = {cell_name(c): cell_labels(cfg, c) for c in cfg.cells}
    numeric = {*metric_columns(cfg), *seconds_columns(cfg)}
    rows, dropped = [], set()
    for i, r in enumerate(raw, start=2):
        if r["cell"] not in labels:
            dropped.add(r["cell"])
            continue
        row: dict[str, Any] = {"cell": r["cell"], **labels[r["cell"]]}
        for key, value in r.items():
            if key in row or key is None:
                continue
            try:
                if key == "seed":
                    row[key] = int(value)
                elif key in numeric:
                    row[key] = float(value) if value not in ("", None) else None
                else:
                    row[key] = value
            except ValueError:
                raise ValueError(f"{path}, line {i}: {key}={value!r} is not a number") from None
        rows.append(row)
    if dropped:
        print(f"  {path}: dropped the rows of cells this sweep does not have: {sorted(dropped)}")
    return rows


def merge_rows(cfg: SweepConfig, earlier: list[dict], rows: list[dict]) -> list[dict]:
    """``earlier`` and ``rows`` joined on (cell, seed), a row of ``rows`` replacing an earlier one; sorted by seed,
    then in the sweep's cell order."""
    merged = {(r["cell"], r["seed"]): r for r in [*earlier, *rows]}
    order = {cell_name(c): i for i, c in enumerate(cfg.cells)}
    return sorted(merged.values(), key=lambda r: (r["seed"], order.get(r["cell"], len(order))))


def _test_metrics(run_dir: Path, cfg, test_set) -> dict[str, float]:  # noqa: ANN001
    """Test metrics of a finished fine-tuning run (classification and detection: also of its EMA)."""
    if cfg.task == "classification":
        return heldout_accuracy(run_dir, test_set)
    if cfg.task == "detection":
        model, cfg = load_detector(run_dir)
        models = {"": model}
        if cfg.recipe.ema_decay is not None:
            models["ema_"] = load_detector(run_dir, ema=True)[0]
        batches = iter_batches(test_set, cfg.optim.batch_size)
        return evaluate_detector(models, batches, test_set.coco, test_set.cat_ids)
    model, cfg = load_dense_model(run_dir)
    return evaluate_dense(model, cfg.task, cfg.head, cfg.data, test_set)


def metric_columns(cfg: SweepConfig) -> list[str]:
    return [f"{ev.name}.{m}" for ev in cfg.evals for m in ev.metrics]


def seconds_columns(cfg: SweepConfig) -> list[str]:
    """The training-time columns of a results row: pretraining, then every eval."""
    return ["pretrain_seconds", *(f"{e.name}.seconds" for e in cfg.evals)]


def summarize(cfg: SweepConfig, rows: list[dict]) -> list[dict]:
    """One row per cell: mean and sample std over seeds of every metric, the paper's number, the seconds."""
    table = []
    for cell in cfg.cells:
        name = cell_name(cell)
        rs = [r for r in rows if r["cell"] == name]
        if cfg.only is not None and not rs:
            continue  # a cell this run did not train and no merged file has
        entry: dict[str, Any] = {"cell": name, **cell_labels(cfg, cell)}
        entry["paper"] = " / ".join(v.paper for v in cell if v.paper) or None
        entry["pretrained"] = all(v.pretrain is not None for v in cell)
        for col in metric_columns(cfg):
            vals = [r[col] for r in rs if col in r and r[col] is not None and not math.isnan(r[col])]
            entry[f"{col}_mean"], entry[f"{col}_std"] = mean_std(vals) if vals else (float("nan"), float("nan"))
            entry[f"{col}_per_seed"] = vals
        entry["seeds"] = [r["seed"] for r in rs]
        times = [_seconds(r, cfg) for r in rs]
        times = [t for t in times if t is not None]
        entry["seconds"] = mean_std(times)[0] if times else float("nan")  # rows merged from older files may lack it
        table.append(entry)
    return table


def _seconds(row: dict, cfg: SweepConfig) -> float | None:
    """Training seconds of one cell and seed (pretraining + every eval), None when a part is not recorded."""
    parts = [row.get(c) for c in seconds_columns(cfg)]
    return None if any(p is None for p in parts) else sum(parts)


def markdown(cfg: SweepConfig, table: list[dict]) -> str:
    cols = metric_columns(cfg)
    seeds = sorted({s for r in table for s in r["seeds"]})
    n = len(seeds)
    arrows = {c: "↑" if HIGHER_IS_BETTER[c.split(".", 1)[1]] else "↓" for c in cols}
    head = [a.name for a in cfg.axes] + [f"{c} {arrows[c]}" for c in cols] + ["paper", "time/seed"]
    lines = []
    if cfg.title:
        lines += [f"**{cfg.title}**", ""]
    if cfg.notes:
        lines += [cfg.notes.strip(), ""]
    spread = f"mean ± std over {n} seeds ({', '.join(map(str, seeds))})" if n > 1 else f"seed {seeds[0]}"
    lines += [f"Test split, {spread}.", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in table:
        cells = [r[a.name] for a in cfg.axes]
        if len(r["seeds"]) != n:  # a cell measured with fewer seeds than the table says
            cells[-1] += f" (seeds {', '.join(map(str, r['seeds'])) or 'none'})"
        for c in cols:
            digits = 3 if c.endswith(("rmse", "abs_rel")) else 2
            mean, std = r[f"{c}_mean"], r[f"{c}_std"]
            cells.append(f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else ""))
        cells += [r["paper"] or "-", "-" if math.isnan(r["seconds"]) else f"{r['seconds']:.0f}s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


#: Axis labels of the metrics, with their units.
METRIC_LABELS = {"top1": "test top-1 (%)", "ema_top1": "test top-1 of the EMA (%)", "miou": "test mIoU (%)",
                 "pixel_acc": "test pixel accuracy (%)", "delta1": "test δ<1.25 (%)", "rmse": "test RMSE (m)",
                 "abs_rel": "test AbsRel", "ap_box": "test box AP (%)", "ap_mask": "test mask AP (%)",
                 "ap50_box": "test box AP50 (%)", "ap50_mask": "test mask AP50 (%)", "dsc": "test mean DSC (%)",
                 "hd95": "test mean HD95"}  # fmt: skip


def plot(cfg: SweepConfig, rows: list[dict], table: list[dict], path: Path) -> None:
    """One panel per metric: per cell the mean over seeds with a bar of +- one standard deviation, and every seed
    as a small dot; points, not bars, so that the y-axis may start where the data do without exaggerating a
    gap, and a dashed line at the reference cell (every axis at its ``reference`` value, by default its first) to
    read the differences against. With two axes the points are grouped by the first axis and coloured by the
    second; one legend for the figure."""
    plt = pyplot()
    if plt is None:
        return None

    cols = metric_columns(cfg)
    n_seeds = len({s for r in table for s in r["seeds"]})
    fig, axes = plt.subplots(1, len(cols), figsize=(max(5.0, 0.9 * len(table) + 2) * len(cols), 4.2), squeeze=False)
    colour_axis = cfg.axes[-1] if len(cfg.axes) > 1 else None
    ref = next((r for r in table if r["cell"] == cfg.reference_cell), table[0] if table else None)
    colours = {v.label: f"C{i}" for i, v in enumerate(colour_axis.values)} if colour_axis else {}
    for ax, col in zip(axes[0], cols, strict=True):
        for i, r in enumerate(table):
            colour = colours.get(r[colour_axis.name], "C0") if colour_axis else "C0" if r["pretrained"] else "C7"
            mean, std = r[f"{col}_mean"], r[f"{col}_std"] or 0.0
            ax.errorbar(i, mean, yerr=std, fmt="o", color=colour, ms=7, capsize=5, elinewidth=1.5, zorder=3)
            seeds = r[f"{col}_per_seed"]
            ax.plot([i + 0.18] * len(seeds), seeds, ".", color="0.35", ms=5, zorder=2)
        if ref is not None and not math.isnan(ref[f"{col}_mean"]):
            ax.axhline(ref[f"{col}_mean"], color="0.6", ls="--", lw=1, zorder=1)
        labels = [" / ".join(r[a.name] for a in cfg.axes[:-1]) if colour_axis else r[cfg.axes[0].name] for r in table]
        ax.set_xticks(range(len(table)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(table) - 0.4)
        finite = [v for r in table for v in r[f"{col}_per_seed"]]
        if finite:
            lo, hi = min(finite), max(finite)
            pad = 0.15 * (hi - lo) + 1e-6
            ax.set_ylim(lo - pad, hi + pad)
        name, metric = col.split(".", 1)
        arrow = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(f"{name}: {METRIC_LABELS.get(metric, metric)}, {arrow} is better", fontsize=9)
        ax.grid(axis="y", color="0.9")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color="0.2", label=f"mean ± std ({n_seeds} seeds)"),
        plt.Line2D([], [], marker=".", ls="", color="0.35", label="one seed"),
        plt.Line2D([], [], ls="--", color="0.6", label=f"reference: {ref['cell']}" if ref else ""),
    ]
    if colour_axis:
        handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=f"{colour_axis.name}: {k}")
                    for k, c in colours.items()]  # fmt: skip
    elif not all(r["pretrained"] for r in table):
        handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=k)
                    for k, c in (("pretrained", "C0"), ("no pretraining", "C7"))]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.suptitle(cfg.title or cfg.name, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
