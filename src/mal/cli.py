"""Command-line entry point: ``mal info``, ``mal pretrain``, ``mal finetune``, ``mal eval``, ``mal demo``,
``mal sweep``.

Training commands take ``--config FILE`` and ``key=value`` overrides (dotted keys of the config, values parsed as
YAML), e.g. ``mal pretrain --config configs/pretrain/mal_micro_digits.yaml optim.epochs=2 run.out_dir=runs/x``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

from mal.config import config_yaml
from mal.engine.loop import NonFiniteLossError, RunInterrupted
from mal.kernels import list_backends
from mal.models import create_model, list_models
from mal.runtime import retain_freed_memory


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _time_forward(model: torch.nn.Module, image_size: tuple[int, int], batch: int, reps: int) -> float:
    """Median seconds per forward of a random batch."""
    x = torch.randn(batch, model.cfg.in_chans, *image_size)
    model(x)  # warm-up (plans, allocator)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def cmd_info(args: argparse.Namespace) -> int:
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


def _train(args: argparse.Namespace, load, train, what: str) -> int:
    """The body of a training command: resolve the config, print it (``--print-config``) or train and report."""
    cfg = load(args.config, args.overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    result = train(cfg, resume=args.resume)
    state = "finished" if result.finished else f"stopped at step {result.step} (continue with --resume)"
    loss = [f"train loss {result.train_loss:.4f}"] if result.train_loss is not None else []
    val = [f"val {k} {v:.4f}" for k, v in result.val.items()]
    print(f"{what} {state} in {result.seconds:.0f}s: {', '.join(loss + val)}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mal.pretrain.task import load_pretrain_config, pretrain

    return _train(args, load_pretrain_config, pretrain, "pretraining")


def cmd_finetune(args: argparse.Namespace) -> int:
    from mal.finetune import finetune, load_finetune_config

    if args.task:  # before the key=value overrides, which may still change it
        args.overrides = [f"task={args.task}", *args.overrides]
    return _train(args, load_finetune_config, finetune, "fine-tuning")


def cmd_eval(args: argparse.Namespace) -> int:
    from mal.data import build_dataset, heldout_split
    from mal.engine import resolve_checkpoint
    from mal.finetune import load_classifier
    from mal.io import write_json
    from mal.tasks.classification import evaluate_classifier, load_class_map, load_real_labels, save_confusion_plot

    ckpt = resolve_checkpoint(args.checkpoint)
    task = (yaml.safe_load((ckpt / "config.yaml").read_text()) or {}).get("task", "classification")
    if task != "classification":
        return _eval_dense(args, ckpt)
    model, cfg = load_classifier(ckpt, ema=args.ema)
    num_classes = model.cfg.num_classes
    name = args.data or cfg.data.name
    split = args.split or heldout_split(name)
    dataset = build_dataset(name, split, root=args.root or cfg.data.root, load_size=cfg.data.load_size)
    class_idx = load_class_map(args.class_map, dataset.classes, num_classes) if args.class_map else None
    if class_idx is None and dataset.num_classes != num_classes:
        raise ValueError(
            f"the dataset has {dataset.num_classes} classes, the model {num_classes}: pass --class-map for a subset"
        )
    real = load_real_labels(args.real) if args.real else None
    image_size = args.image_size or cfg.data.image_size
    res = evaluate_classifier(
        model, dataset, image_size=image_size, batch_size=args.batch, class_indices=class_idx, real_labels=real
    )
    out = Path(args.out) if args.out else ckpt.parent.parent / f"eval_{name}_{split}{'_ema' if args.ema else ''}"
    write_json(out / "metrics.json", {"checkpoint": str(ckpt), "data": name, "split": split, **res})
    save_confusion_plot(res["confusion"], dataset.classes, out / "confusion.png", title=f"{name} {split}")
    k = next(key for key in res if key.startswith("top") and key != "top1")
    line = f"{name}/{split}: top-1 {res['top1']:.2f}%, {k} {res[k]:.2f}% on {res['images']} images"
    if real is not None:
        line += f", ReaL top-1 {res['real_top1']:.2f}%"
    print(f"{line}, {res['img_per_s']:.1f} img/s ({image_size}px)")
    worst = sorted(range(len(res["per_class"])), key=lambda i: res["per_class"][i])[:5]
    print("lowest per-class accuracy: " + ", ".join(f"{dataset.classes[i]} {res['per_class'][i]:.1f}%" for i in worst))
    print(f"wrote {out}/metrics.json and confusion.png")
    return 0


def _eval_dense(args: argparse.Namespace, ckpt) -> int:
    """``mal eval`` of a segmentation / depth checkpoint: mIoU and pixel accuracy, or RMSE, AbsRel, delta<1.25."""
    from mal.data import build_dataset, heldout_split
    from mal.finetune import load_dense_model
    from mal.io import write_json
    from mal.tasks.dense import evaluate_dense

    model, cfg = load_dense_model(ckpt, ema=args.ema)
    name = args.data or cfg.data.name
    split = args.split or heldout_split(name)
    dataset = build_dataset(name, split, root=args.root or cfg.data.root, load_size=cfg.data.load_size)
    res = evaluate_dense(model, cfg.task, cfg.head, cfg.data, dataset, batch_size=args.batch)
    out = Path(args.out) if args.out else ckpt.parent.parent / f"eval_{name}_{split}{'_ema' if args.ema else ''}"
    write_json(out / "metrics.json", {"checkpoint": str(ckpt), "task": cfg.task, "data": name, "split": split, **res})
    if cfg.task == "segmentation":
        line = f"mIoU {res['miou']:.2f}%, pixel accuracy {res['pixel_acc']:.2f}%"
    else:
        line = f"RMSE {res['rmse']:.4f}, AbsRel {res['abs_rel']:.4f}, delta<1.25 {res['delta1']:.2f}%"
    print(f"{name}/{split} ({cfg.task}, {len(dataset)} images): {line}")
    print(f"wrote {out}/metrics.json")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The demos are shipped sweeps: ``configs/sweeps/demo.yaml`` (digits) and ``multitask.yaml`` (dense)."""
    from mal.runs import config_path, load_sweep_config, run_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    dense = args.task == "dense"
    out = args.out or ("runs/demo_dense" if dense else "runs/demo")
    overrides = [f"seeds={list(range(args.seeds))}", f"out_dir={out}", "share_runs=false"]
    cfg = load_sweep_config(config_path(f"configs/sweeps/{'multitask' if dense else 'demo'}.yaml"), overrides)
    if args.labels is not None:
        if dense:
            raise ValueError("--labels applies to the digits demo; the dense demo's label fraction is in its configs")
        for ev in cfg.evals:
            ev.overrides.append(f"data.label_fraction={args.labels}")
    run_sweep(cfg, quick=args.quick, progress=not args.no_progress)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
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
    )
    return 0


def _add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (its _base_ files are loaded first)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.epochs=2")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="PATH",
        help="continue from a checkpoint or run folder (no PATH: the latest checkpoint in run.out_dir)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
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
        "--task", choices=("classification", "segmentation", "depth"), help="the config's task (default: its own)"
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
    demo = sub.add_parser(
        "demo", help="digits: MAL pretrain -> fine-tune with few labels vs from scratch -> table (--task dense: "
        "scenes: AR vs AR + multi-task pretraining -> segmentation and depth)"
    )  # fmt: skip
    demo.add_argument(
        "--task", choices=("classification", "dense"), default="classification",
        help="classification on digits (default) or dense: segmentation + depth on procedural scenes",
    )  # fmt: skip
    demo.add_argument("--out", help="output folder (default runs/demo or runs/demo_dense; finished runs are reused)")
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
    sw.add_argument("--config", required=True, help="sweep YAML, e.g. configs/sweeps/cluster_size.yaml")
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
    retain_freed_memory()

    def fail(message: object, code: int) -> int:
        print(f"mal {args.command}: error: {message}", file=sys.stderr)
        return code

    # every failure: one line naming the cause (and the file), a non-zero exit, the last good checkpoint on disk
    try:
        return args.func(args)
    except RunInterrupted as err:
        print(f"mal {args.command}: {err}", file=sys.stderr)
        return 128 + err.signal
    except KeyboardInterrupt:
        return fail("interrupted; the checkpoints on disk are complete (continue with --resume)", 130)
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError) as err:  # bad input
        return fail(err, 2)
    except NonFiniteLossError as err:
        return fail(err, 3)
    except OSError as err:  # no space, no permission, a failing disk
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        return fail(f"{err.strerror or err}{where}" if err.strerror else err, 4)


if __name__ == "__main__":
    sys.exit(main())
