"""Command-line entry point: ``mal {info}`` (more commands arrive with the pretraining and fine-tuning engine)."""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from mal.kernels import list_backends
from mal.models import create_model, list_models


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
    header = f"{'model':<12} {'params':>12} {'image':>7} {'tokens':>6} {'layout':<28} {'ms/img':>8} {'img/s':>7}"
    print(header)
    print("-" * len(header))
    for name in names:
        model = create_model(name).eval()
        cfg = model.cfg
        h, w = cfg.grid
        size = (h * cfg.patch_size, w * cfg.patch_size)
        layout = (
            "raster"
            if cfg.cluster_size in (None, 1)
            else f"{cfg.cluster_size}x{cfg.cluster_size} clusters, {cfg.scan_schedule}"
        )
        timing = ""
        if not args.no_timing:
            sec = _time_forward(model, size, args.batch, args.reps)
            timing = f"{1000 * sec / args.batch:8.1f} {args.batch / sec:7.1f}"
        print(f"{name:<12} {_count(model):>12,} {size[0]:>4}px {h * w:>6} {layout:<28} {timing}")
    print(
        "params include a 1000-class head; timings: forward, float32, no grad, "
        f"batch {args.batch}, median of {args.reps}."
    )
    return 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"mal {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
