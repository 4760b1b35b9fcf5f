"""Command-line entry point: ``mal info``, ``mal configs``, ``mal pretrain``, ``mal finetune``, ``mal eval``,
``mal predict``, ``mal demo``, ``mal sweep``.

Training commands take ``--config NAME`` (a shipped config, ``mal configs`` lists them) or ``--config FILE``, and
``key=value`` overrides (dotted keys of the config, values parsed as YAML), e.g.
``mal pretrain --config mal_micro_digits optim.epochs=2 run.out_dir=runs/x``.

The heavy imports (torch, the models) happen inside the commands, so ``mal --help`` answers at once.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mal._version import __version__

if TYPE_CHECKING:
    import torch


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _time_forward(model: torch.nn.Module, image_size: tuple[int, int], batch: int, reps: int) -> float:
    """Median seconds per forward of a random batch (no grad)."""
    import torch

    torch.set_grad_enabled(False)
    x = torch.randn(batch, model.cfg.in_chans, *image_size)
    model(x)  # warm-up (plans, allocator)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from mal.kernels import list_backends
    from mal.models import create_model, list_models

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"mal: torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, cuda {'yes' if torch.cuda.is_available() else 'no'}"
    )
    print(f"mLSTM backends: {', '.join(list_backends())}")
    names = args.models or list_models()
    header = f"{'model':<12} {'params':>12} {'image':>7} {'tokens':>6} {'layout':<34} {'ms/img':>8} {'img/s':>7}"
    print(header)
    print("-" * len(header))
    for name in names:
        model = create_model(name).eval()
        cfg = model.cfg
        h, w = cfg.grid
        size = (h * cfg.patch_size, w * cfg.patch_size)
        lay = model.encoder.layout
        kh, kw = lay.cluster_grid
        layout = (
            "raster" if (kh, kw) == (h, w) else f"{kh}x{kw} clusters of {lay.row_spans[0]}, {cfg.layout.scan_schedule}"
        )
        timing = ""
        if not args.no_timing:
            sec = _time_forward(model, size, args.batch, args.reps)
            timing = f"{1000 * sec / args.batch:8.1f} {args.batch / sec:7.1f}"
        print(f"{name:<12} {_count(model):>12,} {size[0]:>4}px {h * w:>6} {layout:<34} {timing}")
    print(
        "params include a 1000-class head; timings: forward, float32, no grad, "
        f"batch {args.batch}, median of {args.reps}."
    )
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    """``mal configs``: the shipped configs, by kind, with the first line of each (what it runs)."""
    from mal.config import KINDS, shipped_configs

    for kind in [args.kind] if args.kind else KINDS:
        print(f"{kind}:")
        for name, path in shipped_configs(kind).items():
            first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
            print(f"  {name:<28} {first[:90]}")
    print("use one with --config NAME (a path to your own YAML works too); print it with --print-config")
    return 0


def _need_config(args: argparse.Namespace, kind: str) -> None:
    """A training command with neither a config nor overrides would start the defaults' long run: stop instead. A
    run folder to resume is config enough (its ``config.yaml``)."""
    if args.config is None and args.resume not in (None, "auto"):
        return
    if args.config is None and args.resume == "auto" and not args.overrides:
        raise ValueError(
            f"--resume without a folder continues run.out_dir of --config: pass --config, or the run folder (mal "
            f"{kind} --resume RUN)"
        )
    if args.config is None and not args.overrides:
        from mal.config import shipped_configs

        names = ", ".join(shipped_configs(kind))
        raise ValueError(
            f"--config is required: a YAML file or the name of a shipped config ({names}); see mal configs"
        )


def _train(args: argparse.Namespace, load, train, what: str, kind: str) -> int:
    """The body of a training command: resolve the config, print it (``--print-config``) or train and report.
    ``--resume RUN`` continues RUN in its folder, with its own config unless ``--config`` is given, and the
    ``key=value`` overrides on top (see :func:`mal.runs.resume_plan`)."""
    from mal.config import config_changes, config_yaml

    config, overrides, saved, notes = args.config, list(args.overrides), None, []
    if args.resume not in (None, "auto"):
        from mal.runs import resume_plan

        saved, overrides, notes = resume_plan(args.resume, kind, overrides)
        config = config or saved
    cfg = load(config, overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    if saved is not None:
        moved = {n.split(": ", 1)[1].split(" ", 1)[0] for n in notes}  # the keys a move adjusted
        changed = [k for k in config_changes(saved, cfg) if k != "run.out_dir" and k not in moved]
        for note in notes:
            print(f"resuming {args.resume}: {note}")
        if changed:
            print(f"resuming {args.resume} with changes to its config: {', '.join(changed)}")
    result = train(cfg, resume=args.resume)
    state = "finished" if result.finished else f"stopped at step {result.step} (continue with --resume)"
    loss = [f"train loss {result.train_loss:.4f}"] if result.train_loss is not None else []
    val = [f"val {k} {v:.4f}" for k, v in result.val.items()]
    print(f"{what} {state} in {result.seconds:.0f}s: {', '.join(loss + val)}")
    out = Path(cfg.run.out_dir)
    print(f"outputs in {out}/:")
    print(f"  checkpoint   {result.checkpoint}  (mal.load_model('{out}'))")
    print(f"  metrics      {out / 'metrics.jsonl'}, {out / 'summary.json'}")
    if cfg.run.tensorboard and (out / "tensorboard").is_dir():
        print(f"  tensorboard  tensorboard --logdir {out / 'tensorboard'}")
    if (out / "images").is_dir():
        print(f"  images       {out / 'images'}/")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mal.pretrain.task import load_pretrain_config, pretrain

    _need_config(args, "pretrain")
    return _train(args, load_pretrain_config, pretrain, "pretraining", "pretrain")


def cmd_finetune(args: argparse.Namespace) -> int:
    from mal.finetune import finetune, load_finetune_config

    _need_config(args, "finetune")
    if args.task:  # before the key=value overrides, which may still change it
        args.overrides = [f"task={args.task}", *args.overrides]
    return _train(args, load_finetune_config, finetune, "fine-tuning", "finetune")


def cmd_eval(args: argparse.Namespace) -> int:
    import yaml

    from mal.data import build_dataset, heldout_split
    from mal.engine import resolve_checkpoint
    from mal.finetune import load_classifier
    from mal.io import write_json
    from mal.tasks.classification import evaluate_classifier, load_class_map, load_real_labels, save_confusion_plot

    ckpt = resolve_checkpoint(args.checkpoint)
    if (ckpt / "config.yaml").is_file():  # a run's checkpoint: its config says the data and the sizes
        task = (yaml.safe_load((ckpt / "config.yaml").read_text()) or {}).get("task", "classification")
        if task == "detection":
            return _eval_detection(args, ckpt)
        if task != "classification":
            return _eval_dense(args, ckpt)
        model, cfg = load_classifier(ckpt, ema=args.ema)
        image_size, eval_crop = cfg.data.image_size, cfg.data.eval_crop
        name, split, dataset = _run_eval_data(args, cfg.data)
    else:  # a folder written by mal.save_model: the model alone; the data come from the command line
        from mal.hub import load_model

        model = load_model(ckpt, ema=args.ema)
        if not hasattr(model, "head") or getattr(model.cfg, "num_classes", 0) == 0:
            raise ValueError(f"{ckpt} holds no classifier: mal eval of a saved model evaluates classifiers")
        if args.data is None:
            raise ValueError(f"{ckpt} is a saved model without a run config: pass the data to evaluate on (--data, "
                             "--root)")  # fmt: skip
        size = model.cfg.image_size
        image_size = size if isinstance(size, int) else max(size)
        eval_crop, name = None, args.data
        split = args.split or heldout_split(name)
        dataset = build_dataset(name, split, root=args.root)
    num_classes = model.cfg.num_classes
    class_idx = load_class_map(args.class_map, dataset.classes, num_classes) if args.class_map else None
    if class_idx is None and dataset.num_classes != num_classes:
        raise ValueError(
            f"the dataset has {dataset.num_classes} classes, the model {num_classes}: pass --class-map for a subset"
        )
    real = load_real_labels(args.real) if args.real else None
    image_size = args.image_size or image_size
    res = evaluate_classifier(
        model, dataset, image_size=image_size, eval_crop=eval_crop, batch_size=args.batch,
        class_indices=class_idx, real_labels=real,
    )  # fmt: skip
    out = Path(args.out) if args.out else ckpt.parent.parent / f"eval_{name}_{split}{'_ema' if args.ema else ''}"
    write_json(out / "metrics.json", {"checkpoint": str(ckpt), "data": name, "split": split, **res})
    plot = save_confusion_plot(res["confusion"], dataset.classes, out / "confusion.png", title=f"{name} {split}")
    k = next(key for key in res if key.startswith("top") and key != "top1")
    line = f"{name}/{split}: top-1 {res['top1']:.2f}%, {k} {res[k]:.2f}% on {res['images']} images"
    if real is not None:
        line += f", ReaL top-1 {res['real_top1']:.2f}%"
    print(f"{line}, {res['img_per_s']:.1f} img/s ({image_size}px)")
    worst = sorted(range(len(res["per_class"])), key=lambda i: res["per_class"][i])[:5]
    print("lowest per-class accuracy: " + ", ".join(f"{dataset.classes[i]} {res['per_class'][i]:.1f}%" for i in worst))
    print(f"wrote {out}/metrics.json" + (" and confusion.png" if plot else ""))
    return 0


def _run_eval_data(args: argparse.Namespace, data) -> tuple:  # noqa: ANN001 (a DataConfig)
    """``(name, split, dataset)`` that ``mal eval`` of a run's checkpoint reads: ``--data`` / ``--split`` /
    ``--root`` over the run's data config, whose ``data.options`` apply only to the run's own data set."""
    from mal.data import build_dataset, heldout_split

    name = args.data or data.name
    split = args.split or heldout_split(name)
    options = data.options if name == data.name else {}
    return name, split, build_dataset(name, split, root=args.root or data.root, load_size=data.load_size, **options)


def _eval_dense(args: argparse.Namespace, ckpt) -> int:
    """``mal eval`` of a segmentation / depth checkpoint: mIoU and pixel accuracy, or RMSE, AbsRel, delta<1.25."""
    from mal.finetune import load_dense_model
    from mal.io import write_json
    from mal.tasks.dense import evaluate_dense

    model, cfg = load_dense_model(ckpt, ema=args.ema)
    name, split, dataset = _run_eval_data(args, cfg.data)
    res = evaluate_dense(model, cfg.task, cfg.head, cfg.data, dataset, batch_size=args.batch)
    out = Path(args.out) if args.out else ckpt.parent.parent / f"eval_{name}_{split}{'_ema' if args.ema else ''}"
    write_json(out / "metrics.json", {"checkpoint": str(ckpt), "task": cfg.task, "data": name, "split": split, **res})
    if cfg.task == "segmentation":
        line = f"mIoU {res['miou']:.2f}%, pixel accuracy {res['pixel_acc']:.2f}%"
        if "dsc" in res:  # a dataset of volumes: the per-volume medical metrics
            line += f", mean DSC {res['dsc']:.2f}%, mean HD95 {res['hd95']:.2f}"
    else:
        line = f"RMSE {res['rmse']:.4f}, AbsRel {res['abs_rel']:.4f}, delta<1.25 {res['delta1']:.2f}%"
    print(f"{name}/{split} ({cfg.task}, {len(dataset)} images): {line}")
    print(f"wrote {out}/metrics.json")
    return 0


def _eval_detection(args: argparse.Namespace, ckpt) -> int:
    """``mal eval`` of a detection checkpoint: COCO AP of boxes (and masks), and a picture of predictions."""
    from mal.engine.logging import save_image_grid
    from mal.finetune import load_detector
    from mal.io import write_json
    from mal.tasks.detection import evaluate_detector, iter_batches, picture_rows

    model, cfg = load_detector(ckpt, ema=args.ema)
    name, split, dataset = _run_eval_data(args, cfg.data)
    batches = list(iter_batches(dataset, args.batch))
    res = evaluate_detector({"": model}, batches, dataset.coco, dataset.cat_ids)
    out = Path(args.out) if args.out else ckpt.parent.parent / f"eval_{name}_{split}{'_ema' if args.ema else ''}"
    write_json(out / "metrics.json", {"checkpoint": str(ckpt), "task": "detection", "data": name, "split": split,
                                      "images": len(dataset), **res})  # fmt: skip
    first = batches[0] if batches else {"images": [], "targets": []}
    rows = picture_rows(model, {k: v[:8] for k, v in first.items()}, model.classes)
    plot = save_image_grid(rows, out / "predictions.png", title=f"{name} {split}: predictions (score >= 0.5)")
    line = f"box AP {res['ap_box']:.2f} (AP50 {res['ap50_box']:.2f}, AP75 {res['ap75_box']:.2f})"
    if "ap_mask" in res:
        line += f", mask AP {res['ap_mask']:.2f} (AP50 {res['ap50_mask']:.2f}, AP75 {res['ap75_mask']:.2f})"
    print(f"{name}/{split} (detection, {len(dataset)} images): {line}")
    print(f"wrote {out}/metrics.json" + (" and predictions.png" if plot else ""))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``mal predict``: a model's predictions on image files. A classifier's top-k (class names when the model has
    them) as a table and a CSV; a segmentation / depth model's maps as PNGs, one per image, under a folder. Exit 0
    when at least one image was predicted (an unreadable file: one line on stderr), else 2."""
    import torch

    from mal.hub import load_model
    from mal.tasks.predict import Predictor, find_images, iter_predictions

    if args.topk < 1 or args.batch_size < 1:
        raise ValueError(f"--topk and --batch-size must be at least 1, got {args.topk} and {args.batch_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available on this machine")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    files = find_images(args.images)
    predictor = Predictor(load_model(args.checkpoint, ema=args.ema), device=device, topk=args.topk)
    dense = predictor.task != "classification"
    out = Path(args.out or ("predictions" if dense else "predictions.csv"))
    if dense and out.is_file():
        raise ValueError(f"--out {out} is a file: a {predictor.task} model writes one PNG per image into a folder")
    if not dense and out.is_dir():
        raise ValueError(f"--out {out} is a folder: a classifier writes a CSV file (e.g. --out {out / 'preds.csv'})")
    names = {}  # output PNG -> input file, for dense models: two inputs must not write one file
    for path, name in files:
        target = out / name.with_suffix(".png")
        if dense and names.setdefault(target, path) != path:
            raise ValueError(f"{names[target]} and {path} would both write {target}: predict them separately")
    by_path = {path: name for path, name in files}

    from tqdm.auto import tqdm

    bar = tqdm(total=len(files), desc="predict", unit="img", dynamic_ncols=True, file=sys.stderr,
               disable=args.no_progress or not sys.stderr.isatty())  # fmt: skip
    rows, done, bad = [], 0, 0
    try:
        for path, pred in iter_predictions(predictor, [p for p, _ in files], args.batch_size):
            bar.update(1)
            if isinstance(pred, BaseException):
                bad += 1
                bar.write(f"mal predict: cannot read {path}: {one_line(pred)}", file=sys.stderr)
                continue
            done += 1
            if dense:
                _save_dense(predictor.task, pred, out / by_path[path].with_suffix(".png"))
            else:
                rows.append((path, pred))
    finally:
        bar.close()
    if not done:
        raise ValueError(f"none of the {len(files)} image file(s) could be read")
    if dense:
        how = "class ids, palette PNG" if predictor.task == "segmentation" else "16-bit PNG of millimetres"
        print(f"{predictor.task}: wrote {done} PNG(s) ({how}) under {out}/" + (f"; {bad} unreadable" if bad else ""))
        return 0
    _print_topk(predictor, rows)
    _write_topk_csv(predictor, rows, out)
    names_from = "the model's class names" if predictor.has_names else "class indices (the model has no names)"
    skipped = f"; {bad} unreadable" if bad else ""
    print(f"wrote {out}: top-{predictor.topk} of {done} image(s), {names_from}{skipped}")
    return 0


def _save_dense(task: str, pred, path: Path) -> None:
    from mal.tasks.predict import save_depth_png, save_mask_png

    (save_mask_png if task == "segmentation" else save_depth_png)(pred, path)


def _print_topk(predictor, rows: list) -> None:
    """One line per image: its path, then the top-k classes with their probabilities."""
    width = max(len(str(p)) for p, _ in rows)
    names = predictor.label_names
    cell = max(len(n) for n in names) + 6  # "name 0.123"
    print(f"{'image':<{width}}  " + "  ".join(f"{f'top-{r + 1}':<{cell}}" for r in range(predictor.topk)).rstrip())
    for path, top in rows:
        cells = [f"{f'{names[i]} {p:.3f}':<{cell}}" for i, p in zip(top.indices, top.probs, strict=True)]
        print(f"{str(path):<{width}}  " + "  ".join(cells).rstrip())


def _write_topk_csv(predictor, rows: list, out: Path) -> None:
    """``path, rank, class, name, probability``: one row per image and rank (1 = most probable), written next to
    ``out`` and renamed into place."""
    import csv

    from mal.io import atomic_write

    def write(f) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "rank", "class", "name", "probability"])
        for path, top in rows:
            for rank, (i, p) in enumerate(zip(top.indices, top.probs, strict=True), 1):
                w.writerow([str(path), rank, i, predictor.label_names[i], f"{p:.6f}"])

    atomic_write(out, write)


def cmd_demo(args: argparse.Namespace) -> int:
    """The demos are shipped sweeps: ``configs/sweeps/demo.yaml`` (digits), ``multitask.yaml`` (dense) and
    ``detection.yaml`` (detection, fine-tuned from the procedural instances written as COCO files)."""
    import torch

    from mal.runs import load_sweep_config, run_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    sweep = {"classification": "demo", "dense": "multitask", "detection": "detection"}[args.task]
    out = args.out or {"classification": "runs/demo", "dense": "runs/demo_dense"}.get(
        args.task, f"runs/demo_{args.task}"
    )
    overrides = [f"seeds={list(range(args.seeds))}", f"out_dir={out}", "share_runs=false"]
    cfg = load_sweep_config(sweep, overrides)  # the shipped sweeps, by name
    if args.labels is not None:
        if args.task != "classification":
            raise ValueError(
                "--labels applies to the digits demo; the other demos' label fractions are in their configs"
            )
        for ev in cfg.evals:
            ev.overrides.append(f"data.label_fraction={args.labels}")
    if args.task == "detection":  # fine-tune from the instances written as COCO files: the file reader runs too
        from mal.runs import write_demo_coco

        root = write_demo_coco(Path(out) / "coco", num_samples=16 if args.quick else None)
        coco = ["data.name=coco", f"data.root={root}", "data.options={}"]
        for ev in cfg.evals:
            ev.overrides += coco
        cfg.quick.finetune = [o for o in cfg.quick.finetune if not o.startswith("data.options")]
    command = ["mal", "demo", "--task", args.task, "--seeds", str(args.seeds), *["--quick"] * args.quick] + (
        ["--labels", str(args.labels)] if args.labels is not None else []
    )
    run_sweep(cfg, quick=args.quick, progress=not args.no_progress, command=shlex.join(command))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import torch

    from mal.config import config_yaml
    from mal.runs import load_sweep_config, run_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_sweep_config(args.config, args.overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    run_sweep(
        cfg,
        quick=args.quick,
        progress=not args.no_progress,
        dry_run=args.dry_run,
        merge=args.merge or [],
        report_only=args.report,
        command=shlex.join(["mal", "sweep", "--config", args.config, *["--quick"] * args.quick, *args.overrides]),
    )
    return 0


def _add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a shipped config's name (mal configs lists them) or a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.epochs=2")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="PATH",
        help="continue a run in its folder: PATH is a run or checkpoint folder, whose config.yaml is used unless "
        "--config is given (overrides apply on top); no PATH: run.out_dir of --config",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mal", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"mal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    cfgs = sub.add_parser("configs", help="list the shipped configs (use them with --config NAME)")
    cfgs.add_argument("kind", nargs="?", choices=("pretrain", "finetune", "sweeps"))
    cfgs.set_defaults(func=cmd_configs)
    info = sub.add_parser("info", help="print the model zoo with parameter counts and forward timings")
    info.add_argument("models", nargs="*", help="model names (default: all)")
    info.add_argument("--batch", type=int, default=1)
    info.add_argument("--reps", type=int, default=3)
    info.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    info.add_argument("--no-timing", action="store_true")
    info.set_defaults(func=cmd_info)
    pre = sub.add_parser("pretrain", help="cluster-masked autoregressive pretraining (MAL)")
    _add_training_args(pre)
    pre.set_defaults(func=cmd_pretrain)
    fin = sub.add_parser(
        "finetune", help="fine-tuning: classification, segmentation or depth (from a checkpoint, scratch, linear probe)"
    )
    _add_training_args(fin)
    fin.add_argument(
        "--task",
        choices=("classification", "segmentation", "depth", "detection"),
        help="the config's task (default: its own)",
    )
    fin.set_defaults(func=cmd_finetune)
    ev = sub.add_parser("eval", help="evaluate a fine-tuned classifier: top-1/top-5, per class, confusion matrix")
    ev.add_argument("--checkpoint", required=True, help="a fine-tuning checkpoint or run folder")
    ev.add_argument("--data", help="dataset name (default: the checkpoint's)")
    ev.add_argument("--root", help="dataset folder (imagefolder)")
    ev.add_argument("--split", help="split (default: test for digits and scenes, val otherwise)")
    ev.add_argument("--class-map", help="dataset class -> model logit index (JSON or 'name index' lines)")
    ev.add_argument("--real", help="ImageNet-ReaL style JSON: a list of correct labels per image")
    ev.add_argument("--image-size", type=int, default=0, help="input size (default: the fine-tuning size)")
    ev.add_argument("--batch", type=int, default=64)
    ev.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    ev.add_argument("--out", help="output folder (default: <run>/eval_<data>_<split>)")
    ev.set_defaults(func=cmd_eval)
    pr = sub.add_parser(
        "predict", help="a model's predictions on image files: a classifier's top-k classes (table + CSV), a "
        "segmentation or depth model's maps (PNGs)"
    )  # fmt: skip
    pr.add_argument("images", nargs="+", metavar="IMAGE|FOLDER", help="image files, or folders (searched recursively)")
    pr.add_argument("--checkpoint", required=True, help="a run, checkpoint or saved-model folder (mal.load_model's)")
    pr.add_argument("--topk", type=int, default=5, help="classes per image (at most the model's; default 5)")
    pr.add_argument(
        "--out", help="classifier: the CSV to write (default predictions.csv); segmentation / depth: the folder of "
        "PNGs (default predictions/)"
    )  # fmt: skip
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    pr.add_argument("--ema", action="store_true", help="the EMA weights of a fine-tuning checkpoint")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_predict)
    demo = sub.add_parser(
        "demo", help="digits: MAL pretrain -> fine-tune with few labels vs from scratch -> table (--task dense: "
        "scenes: AR vs AR + multi-task pretraining -> segmentation and depth; --task detection: Mask R-CNN from "
        "scratch vs MAE vs MAL)"
    )  # fmt: skip
    demo.add_argument(
        "--task", choices=("classification", "dense", "detection"), default="classification",
        help="classification on digits (default), dense: segmentation + depth on procedural scenes, detection: "
        "Mask R-CNN on procedural instances (scratch vs MAE vs MAL)",
    )  # fmt: skip
    demo.add_argument(
        "--out",
        help="output folder (default runs/demo, runs/demo_dense, runs/demo_detection; finished runs are reused)",
    )
    demo.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1; the table reports mean and spread")
    demo.add_argument("--labels", type=float, help="fraction of the training labels for fine-tuning (default 0.1)")
    demo.add_argument("--quick", action="store_true", help="a tiny smoke-test budget (seconds, not minutes)")
    demo.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=cmd_demo)
    sw = sub.add_parser(
        "sweep", help="a grid of pretraining + fine-tuning runs (an ablation table): CSV, markdown table, plot; "
        "finished runs are reused"
    )  # fmt: skip
    sw.add_argument("--config", required=True, help="a shipped sweep's name (cluster_size, ...) or a sweep YAML")
    sw.add_argument("overrides", nargs="*", metavar="key=value", help="sweep overrides, e.g. seeds=[0] out_dir=runs/x")
    sw.add_argument("--quick", action="store_true", help="the sweep's smoke-test budget (seconds per run)")
    sw.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    sw.add_argument("--print-config", action="store_true", help="print the resolved sweep config and exit")
    sw.add_argument(
        "--merge", action="append", metavar="CSV", help="an earlier results.csv (e.g. docs/results/<name>.csv) whose "
        "rows join this run's: one table over seeds measured at different times (repeatable)"
    )  # fmt: skip
    sw.add_argument("--report", action="store_true", help="train nothing: table and plot from the --merge files")
    sw.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    sw.add_argument("--no-progress", action="store_true")
    sw.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "configs":
        from mal.runtime import retain_freed_memory

        retain_freed_memory()
    try:
        return args.func(args)
    except BaseException as err:  # noqa: BLE001 (classified below; anything else propagates with its traceback)
        code = exit_code(err)
        if code is None:
            raise
        if isinstance(err, KeyboardInterrupt):
            message = "error: interrupted; the checkpoints on disk are complete (continue with --resume)"
        elif code > 128:  # a run stopped by a signal, with a checkpoint: not an error of the run
            message = str(err)
        else:
            message = "error: " + (_os_message(err) if code == 4 and getattr(err, "strerror", None) else one_line(err))
        print(f"mal {args.command}: {message}", file=sys.stderr)
        return code


def exit_code(err: BaseException) -> int | None:
    """The exit code of a failure that ends with one line (None: an unexpected error, shown with its traceback).
    2: bad input (config, data, files, a run folder in use) or a resource of the machine (out of memory, a
    data-loader worker killed); 3: a non-finite loss; 4: the disk (no space, a quota, the file-size limit, no
    permission); 128 + the signal that stopped a run; 130: interrupted. Every one leaves the last good checkpoint on
    disk."""
    engine = sys.modules.get("mal.engine.loop")  # a run's own errors exist only once a run was started
    if engine is not None and isinstance(err, engine.RunInterrupted):
        return 128 + err.signal
    if isinstance(err, KeyboardInterrupt):
        return 130
    if isinstance(err, ValueError | FileNotFoundError | FileExistsError | IsADirectoryError | ImportError):
        return 2
    if engine is not None and isinstance(err, engine.NonFiniteLossError):
        return 3
    if engine is not None and isinstance(err, engine.ResourceError):
        return 2
    if isinstance(err, OSError):
        return 4
    return None


def one_line(err: BaseException) -> str:
    """An error's message as one line. An error raised in a data-loader worker arrives as "Caught X in DataLoader
    worker process N." with the worker's traceback: its own message is the traceback's last line."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        name = type(err).__name__
        return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return " ".join(line.strip() for line in text.splitlines())


def _os_message(err: OSError) -> str:
    where = f" ({err.filename})" if err.filename else ""
    return f"{err.strerror}{where}"


if __name__ == "__main__":
    sys.exit(main())
