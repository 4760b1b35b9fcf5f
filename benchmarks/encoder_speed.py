"""Encoder forward throughput: images/s, achieved GFLOP/s and peak memory per backend, resolution and mode.

    python benchmarks/encoder_speed.py [--model vil_tiny] [--batch 8] [--threads 2] [--quick]
    python benchmarks/encoder_speed.py --official /path/to/vision-lstm [--rounds 12] [--only-paired]
    python benchmarks/encoder_speed.py --scaling [--modes] [--rounds 12] [--only-paired]

Each case runs in a fresh subprocess, so its peak resident memory (ru_maxrss) is its own. FLOPs are counted with
``torch.utils.flop_counter`` (matmuls and convs that the case really executes; elementwise work is not counted),
and a large float32 matmul measured in the same run gives the machine's practical GFLOP/s for comparison.
Writes ``benchmarks/results/encoder_speed.json`` (atomically) and prints a table.

``--official PATH`` (a checkout of NX-AI/vision-lstm, which this project does not ship) adds a paired comparison
with the official ``VisionLSTM2`` of the same size at 224 px: both classifiers run in one process, alternately, for
``--rounds`` rounds, and the ratio of their throughputs is taken per round. On a shared machine whose speed drifts
by 2x between minutes, only such a paired ratio is a fair comparison; separate runs are not.

``--scaling`` adds the same kind of paired measurement for the cost of resolution: our encoder (``auto``
backend) at 224 and at 448 px alternately in one process, and per round the ratio of the per-image costs
(the goal is at most 5x for 4x the tokens). ``--modes`` pairs the two modes of the MAL layout at 192 px (4x4
clusters, alternating schedule): the cluster-causal ``pretrain`` mode against ``finetune`` mode, per round the ratio
of their costs, without gradients and for a forward + backward. ``--only-paired`` runs only the paired comparisons.

Every case and paired comparison runs as a library user's script would: it builds the models and sets nothing
process-wide itself, so building them keeps freed memory (``mal.runtime``). Each paired comparison runs twice, each
time in a fresh process: so (``vs_official``, ``scaling`` in the JSON) and with ``MAL_RETAIN_FREED_MEMORY=0``
(``..._opted_out``), glibc's default allocator.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from _child import run_in_child
from mal.io import write_json
from mal.runtime import retain_freed_memory

#: The two ways each paired comparison runs: the library's default and the opt-out of kept freed memory.
ALLOCATORS = {"": {}, "_opted_out": {"MAL_RETAIN_FREED_MEMORY": "0"}}

RESULTS = Path(__file__).parent / "results" / "encoder_speed.json"


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def run_case(
    model_name: str, image: int, mode: str, backend: str, batch: int, reps: int, overrides: dict, compile: bool
) -> dict:
    """One measurement (called in a child process)."""
    from mal.models import create_encoder

    torch.manual_seed(0)
    enc = create_encoder(model_name, image_size=image, backend=backend, **overrides).eval()
    x = torch.randn(batch, 3, image, image)
    with torch.no_grad():
        flops = _count_flops(enc, x, mode)
        t0 = time.perf_counter()
        if compile:  # inductor fuses the elementwise chains around the matmuls; compile time reported apart
            enc = torch.compile(enc, dynamic=False)
        enc(x, mode=mode)  # warm-up: plans, allocator, compilation
        warmup = time.perf_counter() - t0
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            enc(x, mode=mode)
            times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "model": model_name,
        "image": image,
        "tokens": (image // enc.cfg.patch_size) ** 2,
        "mode": mode,
        "backend": backend,
        "compiled": compile,
        "warmup_s": warmup,
        "batch": batch,
        "sec_per_batch": sec,
        "img_per_s": batch / sec,
        "ms_per_img": 1000 * sec / batch,
        "gflop_per_img": flops / batch / 1e9,
        "gflop_per_s": flops / sec / 1e9,
        "peak_rss_mb": peak / 1024,
        "retain_freed_memory": retain_freed_memory(),  # as building the encoder left it (idempotent)
        "rss_growth_mb": (peak - rss_before) / 1024,
    }


def _alternate(calls: dict[str, Callable[[], object]], rounds: int, grad: bool = False) -> dict[str, list[float]]:
    """Seconds of each call per round: one warm-up each, then the calls in turn, ``rounds`` times (no grad unless
    ``grad``)."""
    sec: dict[str, list[float]] = {name: [] for name in calls}
    with torch.set_grad_enabled(grad):
        for fn in calls.values():
            fn()
        for _ in range(rounds):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                sec[name].append(time.perf_counter() - t0)
    return sec


def _ratio_stats(ratios: list[float]) -> dict[str, float]:
    """Median, min and max of the per-round ratios of a paired comparison."""
    ratios = sorted(ratios)
    return {"ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1]}


def compare_official(path: Path, model_name: str, image: int, batch: int, rounds: int) -> dict:
    """Paired throughput of our classifier and the official ``VisionLSTM2`` built with the same dim, depth and
    patch size (eval mode, no grad, float32): alternate forwards, the ratio taken per round."""
    import sys

    from mal.models import create_model

    if not (path / "vision_lstm" / "__init__.py").is_file():
        raise SystemExit(f"--official {path}: not a checkout of NX-AI/vision-lstm (no vision_lstm/__init__.py)")
    sys.path.insert(0, str(path))
    from vision_lstm import VisionLSTM2

    torch.manual_seed(0)
    ours = create_model(model_name, num_classes=1000, image_size=image).eval()
    cfg = ours.encoder.cfg
    official = VisionLSTM2(
        dim=cfg.dim, depth=cfg.depth, patch_size=cfg.patch_size, input_shape=(cfg.in_chans, image, image),
        output_shape=(1000,), mode="classifier", pooling="bilateral_flatten",
    ).eval()  # fmt: skip
    x = torch.randn(batch, cfg.in_chans, image, image)
    sec = _alternate({"official": lambda: official(x), "ours": lambda: ours(x)}, rounds)
    speed = {name: [batch / t for t in times] for name, times in sec.items()}
    return {
        "retain_freed_memory": retain_freed_memory(),  # as building the models left it (idempotent)
        "image": image,
        "batch": batch,
        "rounds": rounds,
        "params_official": sum(p.numel() for p in official.parameters()),
        "params_ours": sum(p.numel() for p in ours.parameters()),
        "img_per_s_official": speed["official"],
        "img_per_s_ours": speed["ours"],
        "median_img_per_s_official": statistics.median(speed["official"]),
        "median_img_per_s_ours": statistics.median(speed["ours"]),
        **_ratio_stats([a / b for a, b in zip(speed["ours"], speed["official"], strict=True)]),
    }


def compare_scaling(model_name: str, images: tuple[int, int], batch: int, rounds: int) -> dict:
    """Paired per-image cost of our encoder (``auto`` backend, eval, no grad, float32) at two resolutions:
    alternate forwards, the ratio ``ms/img at images[1] / ms/img at images[0]`` taken per round."""
    from mal.models import create_encoder

    calls = {}
    for image in images:
        torch.manual_seed(0)
        enc = create_encoder(model_name, image_size=image).eval()
        x = torch.randn(batch, enc.cfg.in_chans, image, image)
        calls[str(image)] = lambda enc=enc, x=x: enc(x)
    ms = {name: [t * 1000 / batch for t in times] for name, times in _alternate(calls, rounds).items()}
    lo, hi = (str(image) for image in images)
    return {
        "retain_freed_memory": retain_freed_memory(),  # as building the models left it (idempotent)
        "images": list(images),
        "batch": batch,
        "rounds": rounds,
        "ms_per_img": ms,
        "median_ms_per_img": {name: statistics.median(v) for name, v in ms.items()},
        **_ratio_stats([b / a for a, b in zip(ms[lo], ms[hi], strict=True)]),
    }


#: The MAL pretraining layout of the per-case rows and of ``--modes``: 4x4 clusters, alternating schedule.
MAL_LAYOUT = {"layout": {"cluster_size": 4, "scan_schedule": "alternating"}}


def compare_modes(model_name: str, image: int, batch: int, rounds: int) -> dict:
    """Paired per-image cost of one encoder (MAL layout, ``auto`` backend, float32) in ``pretrain`` and ``finetune``
    mode: alternate calls, per round the ratio ``pretrain / finetune``; without gradients, then forward + backward
    (of the mean square of the features)."""
    from mal.models import create_encoder

    torch.manual_seed(0)
    enc = create_encoder(model_name, image_size=image, **MAL_LAYOUT)
    x = torch.randn(batch, enc.cfg.in_chans, image, image)
    modes = ("finetune", "pretrain")
    result = {"retain_freed_memory": retain_freed_memory(), "image": image, "batch": batch, "rounds": rounds}
    for prefix, grad in (("", False), ("train_", True)):

        def call(mode: str, grad: bool = grad) -> None:
            out = enc(x, mode=mode)
            if grad:
                out.square().mean().backward()

        sec = _alternate({m: lambda m=m: call(m) for m in modes}, rounds, grad=grad)
        ms = {m: [t * 1000 / batch for t in times] for m, times in sec.items()}
        result[prefix + "ms_per_img"] = ms
        ratios = [b / a for a, b in zip(ms["finetune"], ms["pretrain"], strict=True)]
        result.update({prefix + k: v for k, v in _ratio_stats(ratios).items()})
    return result


def _allocator(result: dict) -> str:
    return "freed memory kept" if result["retain_freed_memory"] else "glibc's default allocator"


def _count_flops(enc, x: torch.Tensor, mode: str) -> int:
    with FlopCounterMode(display=False) as counter:
        enc(x, mode=mode)
    return counter.get_total_flops()


def run_one(kind: str = "case", **case) -> dict:
    """A child's work: one measurement of :func:`run_case`, or one paired comparison."""
    if kind == "official":
        return compare_official(Path(case.pop("path")), **case)
    if kind == "scaling":
        return compare_scaling(images=tuple(case.pop("images")), **case)
    if kind == "modes":
        return compare_modes(**case)
    return run_case(**case)


def paired_in_children(kind: str, threads: int, **case) -> dict[str, dict]:
    """One paired comparison in a fresh process per allocator setting (:data:`ALLOCATORS`), keyed by its suffix."""
    return {suffix: run_in_child(__file__, threads, dict(kind=kind, **case), env) for suffix, env in ALLOCATORS.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vil_tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="224 px only, parallel + chunkwise")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases (about a minute each)")
    p.add_argument("--official", type=Path, help="checkout of NX-AI/vision-lstm: paired comparison at 224 px")
    p.add_argument("--scaling", action="store_true", help="paired per-image cost at 448 vs 224 px (ours)")
    p.add_argument("--modes", action="store_true", help="paired cost of pretrain vs finetune mode, MAL layout, 192 px")
    p.add_argument("--rounds", type=int, default=12, help="rounds of each paired comparison")
    p.add_argument("--only-paired", action="store_true", help="run only the paired comparisons")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: JSON case description
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))))
        return

    if args.only_paired and args.official is None and not args.scaling and not args.modes:
        p.error("--only-paired needs --official PATH, --scaling or --modes")
    backends = ["parallel", "chunkwise"] if args.quick else ["auto", "parallel", "chunkwise", "recurrent"]
    cases = []
    for image in (224,) if args.quick else (224, 448):
        for backend in backends:
            if backend == "recurrent" and image > 224:
                continue  # step-by-step reference: minutes at 784 tokens, says nothing new
            cases.append(dict(image=image, mode="finetune", backend=backend, overrides={}, compile=False))
        if not args.no_compile:
            cases.append(dict(image=image, mode="finetune", backend="auto", overrides={}, compile=True))
    # MAL pretraining layout: 192 px, 4x4 clusters, alternating schedule; finetune vs cluster-causal pretrain mode
    for mode in ("finetune", "pretrain"):
        cases.append(dict(image=192, mode=mode, backend="auto", overrides=MAL_LAYOUT, compile=False))
    if args.only_paired:
        cases = []

    gflops_matmul = matmul_gflops()
    rows = []
    for case in cases:
        desc = dict(model_name=args.model, batch=args.batch, reps=args.reps, **case)
        row = run_in_child(__file__, args.threads, desc)
        row["layout"] = "4x4 clusters, alternating" if case["overrides"] else "raster"
        rows.append(row)
        print(
            f"{row['model']:<9} {row['image']:>4}px {row['tokens']:>4} tok {row['mode']:<8} {row['backend']:<9} "
            f"{'compiled' if row['compiled'] else 'eager':<8} "
            f"{row['layout']:<26} {row['img_per_s']:7.2f} img/s {row['ms_per_img']:7.1f} ms/img "
            f"{row['gflop_per_img']:6.2f} GFLOP/img {row['gflop_per_s']:6.1f} GFLOP/s "
            f"peak {row['peak_rss_mb']:7.0f} MB",
            flush=True,
        )

    paired: dict[str, dict] = {}
    if args.official is not None:
        case = dict(path=str(args.official.resolve()), model_name=args.model, image=224, batch=args.batch)
        for suffix, vs in paired_in_children("official", args.threads, rounds=args.rounds, **case).items():
            paired["vs_official" + suffix] = vs
            print(
                f"{args.model} vs official VisionLSTM2, 224 px, batch {args.batch}, {args.rounds} paired rounds, "
                f"{_allocator(vs)}: {vs['median_img_per_s_ours']:.2f} vs {vs['median_img_per_s_official']:.2f} "
                f"img/s (medians); ratio per round: median {vs['ratio_median']:.2f}, min {vs['ratio_min']:.2f}, "
                f"max {vs['ratio_max']:.2f}",
                flush=True,
            )
    if args.scaling:
        case = dict(model_name=args.model, images=[224, 448], batch=args.batch, rounds=args.rounds)
        for suffix, sc in paired_in_children("scaling", args.threads, **case).items():
            paired["scaling" + suffix] = sc
            med = sc["median_ms_per_img"]
            print(
                f"{args.model} (auto), batch {args.batch}, {args.rounds} paired rounds, {_allocator(sc)}: "
                f"{med['224']:.1f} ms/img at 224 px, {med['448']:.1f} at 448 px; cost ratio 448/224 per round: "
                f"median {sc['ratio_median']:.2f}, min {sc['ratio_min']:.2f}, max {sc['ratio_max']:.2f}",
                flush=True,
            )

    if args.modes:
        case = dict(model_name=args.model, image=192, batch=args.batch, rounds=args.rounds)
        for suffix, md in paired_in_children("modes", args.threads, **case).items():
            paired["modes" + suffix] = md
            print(
                f"{args.model} (MAL layout), 192 px, batch {args.batch}, {args.rounds} paired rounds, "
                f"{_allocator(md)}: pretrain / finetune mode cost per round: median {md['ratio_median']:.2f} "
                f"(min {md['ratio_min']:.2f}, max {md['ratio_max']:.2f}) without gradients, "
                f"{md['train_ratio_median']:.2f} ({md['train_ratio_min']:.2f}-{md['train_ratio_max']:.2f}) "
                "forward + backward",
                flush=True,
            )

    def pick(image, mode, backend, layout="raster", compiled=False):
        key = (image, mode, backend, layout, compiled)
        return next((r for r in rows if (r["image"], r["mode"], r["backend"], r["layout"], r["compiled"]) == key), None)

    summary = {"matmul_gflop_per_s": gflops_matmul}
    auto224, auto448 = pick(224, "finetune", "auto"), pick(448, "finetune", "auto")
    if auto224 and auto448:
        summary["img_per_s_224_eager"] = auto224["img_per_s"]
        summary["cost_ratio_448_vs_224_per_img"] = auto448["ms_per_img"] / auto224["ms_per_img"]
    c224, c448 = pick(224, "finetune", "auto", compiled=True), pick(448, "finetune", "auto", compiled=True)
    if c224 and c448:
        summary["img_per_s_224_compiled"] = c224["img_per_s"]
        summary["cost_ratio_448_vs_224_per_img_compiled"] = c448["ms_per_img"] / c224["ms_per_img"]
    ft, pt = (pick(192, m, "auto", "4x4 clusters, alternating") for m in ("finetune", "pretrain"))
    if ft and pt:
        summary["pretrain_vs_finetune_cost_192"] = pt["ms_per_img"] / ft["ms_per_img"]
    for suffix in ALLOCATORS:
        if "vs_official" + suffix in paired:
            summary["vs_official_ratio_median" + suffix] = paired["vs_official" + suffix]["ratio_median"]
        if "scaling" + suffix in paired:
            summary["paired_cost_ratio_448_vs_224" + suffix] = paired["scaling" + suffix]["ratio_median"]
        if "modes" + suffix in paired:
            summary["paired_pretrain_vs_finetune" + suffix] = paired["modes" + suffix]["ratio_median"]
            summary["paired_pretrain_vs_finetune_train" + suffix] = paired["modes" + suffix]["train_ratio_median"]
    print(f"\nlarge matmul (2048^3, float32): {gflops_matmul:.1f} GFLOP/s on {args.threads} threads")
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")

    result = {
        "benchmark": "encoder_speed",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "summary": summary,
        "rows": rows,
        **{
            key + suffix: paired.get(key + suffix)
            for key in ("vs_official", "scaling", "modes")
            for suffix in ALLOCATORS
        },
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
