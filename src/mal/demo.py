"""``mal demo``: the whole pipeline on the embedded digits data, per seed:

1. MAL pretraining of ``mal_micro`` on the training split (no labels), ``configs/pretrain/mal_micro_digits.yaml``;
2. fine-tuning with a fraction of the training labels from that checkpoint, ``configs/finetune/mal_micro_digits.yaml``;
3. the same fine-tuning from scratch (the supervised baseline, same recipe and budget);

then the top-1 accuracy of each on the held-out test split, as a table (mean and spread over seeds) and plots.
Finished runs are reused, interrupted ones resumed, so a second call only adds what is missing.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from mal.config import to_dict
from mal.data import build_dataset
from mal.engine import latest_checkpoint, read_metrics
from mal.engine.loop import config_changes
from mal.evaluate import evaluate_classifier
from mal.finetune import finetune, load_finetune_config
from mal.finetune.task import load_classifier
from mal.io import atomic_write, write_json
from mal.pretrain.task import load_pretrain_config, pretrain

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# a smoke-test budget (tests, --quick): a tiny model for a few steps (fine-tuning takes the pretrained model's size)
QUICK_SIZE = ["data.image_size=16", "data.load_size=16"]
QUICK_PRE = ["model.overrides.dim=32", "model.overrides.depth=1", "model.overrides.num_heads=2", *QUICK_SIZE,
             "model.overrides.layout.cluster_size=2", "objective.decoder_dim=16", "objective.decoder_depth=1",
             "objective.decoder_heads=2", "optim.max_steps=4", "optim.batch_size=32", "run.eval_every=null",
             "run.image_every=null"]  # fmt: skip
QUICK_FT = [*QUICK_SIZE, "optim.max_steps=4", "optim.batch_size=16", "run.eval_every=2"]


def _config(kind: str, name: str = "mal_micro_digits") -> Path:
    return config_path(f"configs/{kind}/{name}.yaml")


def config_path(path: str | Path) -> Path:
    """A config file given as an absolute path, relative to the working directory, or relative to the repository
    (``configs/...`` works from any directory of a checkout)."""
    p = Path(path)
    if p.is_absolute() or p.is_file():
        if not p.is_file():
            raise FileNotFoundError(f"config {p} not found")
        return p
    repo = CONFIGS.parent / p
    if not repo.is_file():
        raise FileNotFoundError(f"config {path} not found (also not in the checkout {CONFIGS.parent})")
    return repo


def same_model(pretrain_cfg) -> str:  # noqa: ANN001
    """The override that gives a fine-tuning run the model (name, overrides, layout) of a pretraining config: what a
    from-scratch baseline trains, since without a checkpoint it has no weights to take them from."""
    return "model=" + json.dumps(to_dict(pretrain_cfg.model))


def run_or_reuse(train, cfg, out_dir: Path):
    """Train unless ``out_dir`` holds a finished run; resume an interrupted one. Returns its summary. A finished run
    trained with another config is an error (its numbers would be reported as this config's)."""
    summary = out_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("finished"):
        changed = config_changes(out_dir / "config.yaml", cfg)
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
    out = {"top1": evaluate_classifier(model, test_set, image_size=cfg.data.image_size)["top1"]}
    if cfg.recipe.ema_decay is not None:
        model, _ = load_classifier(run_dir, ema=True)
        out["ema_top1"] = evaluate_classifier(model, test_set, image_size=cfg.data.image_size)["top1"]
    return out


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    seeds: int = 1,
    label_fraction: float = 0.1,
    quick: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or complete) the demo in ``out_dir``; returns ``{"runs": [...], "table": [...]}`` and writes
    ``results.json``, ``results.md`` and ``plots/``."""
    out = Path(out_dir)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    test_set = None
    runs: list[dict[str, Any]] = []
    common = [f"run.progress={str(progress).lower()}", "run.tensorboard=false"]
    t_all = time.perf_counter()
    for seed in range(seeds):
        base = out / f"seed{seed}"
        pre_over = [*common, f"run.seed={seed}", f"run.out_dir={base / 'pretrain'}", *(QUICK_PRE if quick else [])]
        pre_cfg = load_pretrain_config(_config("pretrain"), pre_over)
        print(f"[seed {seed}] 1/3 MAL pretraining ({pre_cfg.model.name}, {pre_cfg.data.name}, no labels)")
        pre = run_or_reuse(pretrain, pre_cfg, base / "pretrain")
        for method in ("mal", "scratch"):
            scratch = ["init.mode=scratch", "init.checkpoint=null", same_model(pre_cfg)]
            init = [f"init.checkpoint={base / 'pretrain'}"] if method == "mal" else scratch
            ft_over = [
                *common, *init, f"run.seed={seed}", f"run.out_dir={base / method}",
                f"data.label_fraction={label_fraction}", *(QUICK_FT if quick else []),
            ]  # fmt: skip
            ft_cfg = load_finetune_config(_config("finetune"), ft_over)
            step = "2/3 fine-tuning the MAL encoder" if method == "mal" else "3/3 fine-tuning from scratch"
            print(f"[seed {seed}] {step} with {label_fraction:.0%} of the labels")
            ft = run_or_reuse(finetune, ft_cfg, base / method)
            if test_set is None:
                test_set = build_dataset(ft_cfg.data.name, "test", load_size=ft_cfg.data.load_size)
            acc = heldout_accuracy(base / method, test_set)
            n_labels = len(build_dataset("digits", "train", label_fraction=label_fraction, seed=seed))
            seconds = ft["seconds"] + (pre["seconds"] if method == "mal" else 0.0)
            runs.append({"seed": seed, "method": method, "labels": n_labels, "seconds": seconds, **acc})
            print(f"[seed {seed}] {method}: test top-1 {acc['top1']:.2f}%")
    table = _table(runs, label_fraction)
    result = {"runs": runs, "table": table, "label_fraction": label_fraction, "seeds": seeds, "quick": quick}
    write_json(out / "results.json", result)
    atomic_write(out / "results.md", lambda f: f.write(_markdown(table, seeds)))
    _plots(out, runs, seeds)
    print(_markdown(table, seeds))
    print(f"demo finished in {time.perf_counter() - t_all:.0f}s; results, plots and runs in {out}/")
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _table(runs: list[dict], label_fraction: float) -> list[dict]:
    rows = []
    names = {"mal": "MAL pretrain + fine-tune", "scratch": "from scratch (same fine-tuning)"}
    for method in ("mal", "scratch"):
        rs = [r for r in runs if r["method"] == method]
        acc = [r["top1"] for r in rs]
        ema = [r["ema_top1"] for r in rs if "ema_top1" in r]
        mean, std = mean_std(acc)
        rows.append({
            "method": names[method],
            "labels": f"{label_fraction:.0%} ({rs[0]['labels']})",
            "top1_mean": mean,
            "top1_std": std,
            "ema_top1_mean": statistics.mean(ema) if ema else None,
            "seconds_mean": statistics.mean(r["seconds"] for r in rs),
            "top1_per_seed": acc,
        })  # fmt: skip
    return rows


def _markdown(table: list[dict], seeds: int) -> str:
    spread = f" (mean ± std, {seeds} seeds)" if seeds > 1 else ""
    lines = [
        f"| method | labels | top-1 on the test split{spread} | EMA top-1 | time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in table:
        acc = f"{r['top1_mean']:.2f}" + (f" ± {r['top1_std']:.2f}" if seeds > 1 else "")
        ema = f"{r['ema_top1_mean']:.2f}" if r["ema_top1_mean"] is not None else "-"
        lines.append(f"| {r['method']} | {r['labels']} | {acc} | {ema} | {r['seconds_mean']:.0f}s |")
    return "\n".join(lines) + "\n"


def _plots(out: Path, runs: list[dict], seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for seed in range(seeds):
        m = out / f"seed{seed}" / "pretrain" / "metrics.jsonl"
        tr, va = read_metrics(m, "train"), read_metrics(m, "val")
        first = seed == 0
        a.plot([r["step"] for r in tr], [r["loss"] for r in tr], "C0", alpha=0.6, label="train" if first else None)
        a.plot([r["step"] for r in va], [r["loss"] for r in va], "o-", color="C1", label="val" if first else None)
        for i, method in enumerate(("mal", "scratch")):
            v = read_metrics(out / f"seed{seed}" / method / "metrics.jsonl", "val")
            b.plot([r["step"] for r in v], [r["top1"] for r in v], "o-", color=f"C{i + 2}", alpha=0.7,
                   label=method if not seed else None)  # fmt: skip
    a.set(title="MAL pretraining loss (normalized-pixel MSE)", xlabel="step", ylabel="loss")
    b.set(title="fine-tuning: validation top-1", xlabel="step", ylabel="top-1 (%)")
    a.legend()
    b.legend()
    fig.tight_layout()
    atomic_write(plots / "loss_curves.png", lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for i, method in enumerate(("mal", "scratch")):
        acc = [r["top1"] for r in runs if r["method"] == method]
        mean, std = mean_std(acc)
        ax.bar(i, mean, yerr=std, color=f"C{i + 2}", capsize=6, alpha=0.8)
        ax.plot([i] * len(acc), acc, "k.", zorder=3)
    ax.set_xticks([0, 1], ["MAL + fine-tune", "from scratch"])
    ax.set(ylabel="test top-1 (%)", title=f"digits, {seeds} seed(s)")
    fig.tight_layout()
    atomic_write(plots / "accuracy.png", lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)

    images = sorted((out / "seed0" / "pretrain" / "images").glob("step_*.png"))
    if images:
        data = images[-1].read_bytes()
        atomic_write(plots / "reconstructions.png", lambda f: f.write(data), mode="wb")


# ------------------------------------------------------------------------------------------------ dense demo

DENSE_INITS = {
    "scratch": "from scratch",
    "ar": "AR pretraining only",
    "mt": "AR + multi-task pretraining",
}
DENSE_QUICK_PRE = [*QUICK_PRE, "optim.max_steps=3", "optim.batch_size=16", "data.val_split=null"]
DENSE_QUICK_FT = [*QUICK_SIZE, "head.channels=8", "optim.max_steps=3", "optim.batch_size=8", "run.eval_every=null",
                  "data.val_split=null"]  # fmt: skip


def run_dense_demo(
    out_dir: str | Path = "runs/demo_dense", *, seeds: int = 1, quick: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Per seed on the procedural scenes: stage-1 AR pretraining, then two stage-2 runs of the same length from it
    (AR + depth + segmentation, and AR only), then segmentation and depth fine-tuning with the same budget from
    (a) scratch, (b) AR-only and (c) multi-task pretraining; test mIoU / pixel accuracy and RMSE / AbsRel /
    delta<1.25. Writes ``results.json``, ``results.md`` and ``plots/`` (loss curves, predictions)."""
    from mal.data import build_dataset
    from mal.finetune.dense import evaluate_dense, load_dense_model

    out = Path(out_dir)
    common = [f"run.progress={str(progress).lower()}", "run.tensorboard=false"]
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    test_set = None
    for seed in range(seeds):
        base = out / f"seed{seed}"
        sd = [*common, f"run.seed={seed}"]
        qp = DENSE_QUICK_PRE if quick else []
        cfg1 = load_pretrain_config(
            _config("pretrain", "mal_micro_scenes"), [*sd, f"run.out_dir={base / 'stage1'}", *qp]
        )
        print(f"[seed {seed}] 1/4 stage 1: autoregressive pretraining on scenes (images only)")
        pre_s = {"stage1": run_or_reuse(pretrain, cfg1, base / "stage1")["seconds"]}
        for name, extra in (("mt", []), ("ar", ["multitask.depth_weight=0", "multitask.seg_weight=0"])):
            what = "AR + depth + segmentation" if name == "mt" else "AR only (the same steps)"
            print(f"[seed {seed}] {'2' if name == 'mt' else '3'}/4 stage 2: {what}")
            cfg2 = load_pretrain_config(
                _config("pretrain", "mal_micro_multitask"),
                [*sd, f"init.checkpoint={base / 'stage1'}", f"run.out_dir={base / f'stage2_{name}'}", *extra, *qp],
            )
            pre_s[name] = run_or_reuse(pretrain, cfg2, base / f"stage2_{name}")["seconds"]
        print(f"[seed {seed}] 4/4 fine-tuning segmentation and depth from scratch / AR / AR + multi-task")
        for task in ("segmentation", "depth"):
            for init in DENSE_INITS:
                src = ["init.mode=scratch", "init.checkpoint=null", same_model(cfg1)] if init == "scratch" else [
                    f"init.checkpoint={base / f'stage2_{init}'}"]  # fmt: skip
                run_dir = base / f"{task}_{init}"
                cfg = load_finetune_config(
                    _config("finetune", "mal_micro_scenes_seg" if task == "segmentation" else "mal_micro_scenes_depth"),
                    [*sd, *src, f"run.out_dir={run_dir}", *(DENSE_QUICK_FT if quick else [])],
                )
                ft = run_or_reuse(finetune, cfg, run_dir)
                if test_set is None:
                    quick_n = {"num_samples": 32} if quick else {}
                    test_set = build_dataset(cfg.data.name, "test", load_size=cfg.data.load_size, **quick_n)
                model, cfg = load_dense_model(run_dir)
                metrics = evaluate_dense(model, cfg, test_set)
                pretrain_s = 0.0 if init == "scratch" else pre_s["stage1"] + pre_s[init]
                runs.append({"seed": seed, "task": task, "init": init, "seconds": ft["seconds"] + pretrain_s,
                             **{k: v for k, v in metrics.items() if k != "loss"}})  # fmt: skip
                key = "miou" if task == "segmentation" else "rmse"
                print(f"[seed {seed}] {task} ({DENSE_INITS[init]}): test {key} {metrics[key]:.3f}")
    table = _dense_table(runs)
    result = {"runs": runs, "table": table, "seeds": seeds, "quick": quick}
    write_json(out / "results.json", result)
    atomic_write(out / "results.md", lambda f: f.write(_dense_markdown(table, seeds)))
    _dense_plots(out, seeds)
    print(_dense_markdown(table, seeds))
    print(f"dense demo finished in {time.perf_counter() - t_all:.0f}s; results, plots and runs in {out}/")
    return result


def _dense_table(runs: list[dict]) -> list[dict]:
    rows = []
    for init, name in DENSE_INITS.items():
        row: dict[str, Any] = {"init": init, "method": name}
        for task, keys in (("segmentation", ("miou", "pixel_acc")), ("depth", ("rmse", "abs_rel", "delta1"))):
            rs = [r for r in runs if r["task"] == task and r["init"] == init]
            for k in keys:
                row[f"{k}_mean"], row[f"{k}_std"] = mean_std([r[k] for r in rs])
                row[f"{k}_per_seed"] = [r[k] for r in rs]
        rows.append(row)
    return rows


def _dense_markdown(table: list[dict], seeds: int) -> str:
    spread = f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""

    def cell(r: dict, k: str, fmt: str) -> str:
        return f"{r[f'{k}_mean']:{fmt}}" + (f" ± {r[f'{k}_std']:{fmt}}" if seeds > 1 else "")

    lines = [
        f"Procedural scenes, test split{spread}; same fine-tuning budget for every row.",
        "",
        "| initialization | mIoU (%) ↑ | pixel acc. (%) ↑ | RMSE (m) ↓ | AbsRel ↓ | δ<1.25 (%) ↑ |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in table:
        lines.append(
            f"| {r['method']} | {cell(r, 'miou', '.2f')} | {cell(r, 'pixel_acc', '.2f')} | {cell(r, 'rmse', '.3f')} "
            f"| {cell(r, 'abs_rel', '.3f')} | {cell(r, 'delta1', '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def _dense_plots(out: Path, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for seed in range(seeds):
        first = seed == 0
        offset = 0  # stage 2 is drawn after stage 1's last step
        for i, name in enumerate(("stage1", "stage2_mt", "stage2_ar")):
            tr = read_metrics(out / f"seed{seed}" / name / "metrics.jsonl", "train")
            if name == "stage1":
                offset = tr[-1]["step"] if tr else 0
                tr_offset = 0
            else:
                tr_offset = offset
            axes[0].plot([r["step"] + tr_offset for r in tr], [r["loss"] for r in tr], color=f"C{i}", alpha=0.6,
                         label=name if first else None)  # fmt: skip
        for j, (task, key) in enumerate((("segmentation", "miou"), ("depth", "rmse"))):
            for i, init in enumerate(DENSE_INITS):
                v = read_metrics(out / f"seed{seed}" / f"{task}_{init}" / "metrics.jsonl", "val")
                axes[j + 1].plot([r["step"] for r in v], [r[key] for r in v], "o-", color=f"C{i + 3}", alpha=0.7,
                                 label=DENSE_INITS[init] if first else None)  # fmt: skip
    axes[0].set(title="pretraining loss (stage 2 includes the dense losses)", xlabel="step", ylabel="loss")
    axes[1].set(title="segmentation: validation mIoU", xlabel="step", ylabel="mIoU (%)")
    axes[2].set(title="depth: validation RMSE", xlabel="step", ylabel="RMSE (m)")
    for a in axes:
        a.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(plots / "curves.png", lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    for task in ("segmentation", "depth"):
        images = sorted((out / "seed0" / f"{task}_mt" / "images").glob("step_*.png"))
        if images:
            data = images[-1].read_bytes()
            atomic_write(plots / f"{task}_predictions.png", lambda f, d=data: f.write(d), mode="wb")
