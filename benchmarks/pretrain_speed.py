"""Training-step throughput: the MAL pretraining step against the supervised step of the same encoder.

    python benchmarks/pretrain_speed.py [--batch 8] [--threads 2] [--reps 3] [--quick] [--cases pretrain mae ...]
        [--decoders all|default]

Cases (ViL-T and ViT-T at 192 px, float32 on the CPU):

- ``pretrain``: ``MALPretrainer(create_encoder("mal_tiny"), ObjectiveConfig(decoder_dim, decoder_depth,
  decoder_heads))`` (4x4 clusters, alternating schedule, encoder in cluster-causal ``pretrain`` mode), one step
  ``loss.backward(); optimizer.step(); optimizer.zero_grad()``, for the default decoder (512 wide, 8 blocks,
  16 heads) and smaller ones;
- ``supervised``: ``create_model("vil_tiny")`` (raster layout, 1000 classes), forward + cross-entropy + backward
  + optimizer step; the reference of the cost ratio (the goal: a pretraining step costs at most 1.6x this);
- ``finetune``: ``create_model("mal_tiny")`` (the MAL layout, ``finetune`` mode), the same supervised step;
- ``mae``: the MAE baseline on the same ViL encoder, ``MAEPretrainer(create_encoder("mal_tiny"),
  ObjectiveConfig(method="mae", mask_ratio=0.75, decoder_...))``: the encoder runs on the 25 % visible patches,
  the decoder (the same sizes as ``pretrain``) on all of them;
- ``vit_supervised``, ``vit_pretrain``, ``vit_mae``: the same three steps for ViT-T (``vit_tiny``: pre-norm
  Transformer, same patch/position embedding and MAL layout; cluster-causal attention in ``pretrain`` mode), with
  the default decoder only.

Each case's cost is reported against the supervised step of its own encoder (``vit_supervised`` for the ViT
cases, ``supervised`` for the ViL ones; ``cost_ratio_vs_supervised`` stays the ratio to the ViL ``supervised``
step for every case). ``--cases`` picks a subset (a ratio whose reference step did not run is left out);
``--decoders default`` runs only the default decoder of ``pretrain`` and ``mae``.

Every step uses AdamW on the training code's parameter groups (``mal.engine.optim``). A step is timed after one
warm-up step; the median of ``--reps`` steps is reported. Each case runs in a fresh subprocess, so its peak
resident memory (ru_maxrss) is its own. FLOPs of one forward + backward are 3x the forward's as counted by
``torch.utils.flop_counter`` (matmuls, convs and attention; elementwise work and the optimizer are not counted);
for ``pretrain`` and ``mae`` the decoder's share is counted apart (the rest is the encoder). ``--quick`` is a smoke
test: 64 px, 1 rep, and 2x2 clusters for the MAL layout (4x4 clusters of 16 px patches would leave a single unit
at 64 px, i.e. nothing to predict). On a machine whose cores are busy with other work, pass ``--threads 1``: with
2 threads, OpenMP's spin-waiting made single quick cases up to 100x slower on this project's 2-core VM.

When ``torch.cuda.is_available()`` (or with ``--device cuda``) the same script runs on the GPU: bf16 autocast
for the forward pass and the loss, batch 256 unless ``--batch`` is given, ``torch.cuda.synchronize()`` around
every timed step, peak memory from ``torch.cuda.max_memory_allocated`` (``peak_mem_mb``; ``peak_rss_mb`` is always
the process's resident memory); a case that runs out of GPU memory is recorded as ``"oom"``.
Writes ``benchmarks/results/pretrain_speed.json`` (atomically) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from _child import run_in_child
from mal.io import write_json
from mal.runtime import retain_freed_memory

RESULTS = Path(__file__).parent / "results" / "pretrain_speed.json"
# (decoder_dim, decoder_depth, decoder_heads): the default of ObjectiveConfig first, then smaller decoders
DECODERS = [(512, 8, 16), (512, 4, 16), (384, 4, 12), (256, 4, 8), (256, 2, 8)]
GOAL_RATIO = 1.6  # the issue's goal: pretraining step cost <= 1.6x the supervised forward + backward
NUM_CLASSES = 1000
# case kind -> (registered model, the kind of the supervised step of the same encoder: the reference of its ratio);
# also the run order: every reference step runs before the steps measured against it
KINDS = {
    "supervised": ("vil_tiny", "supervised"),
    "finetune": ("mal_tiny", "supervised"),
    "pretrain": ("mal_tiny", "supervised"),
    "mae": ("mal_tiny", "supervised"),
    "vit_supervised": ("vit_tiny", "vit_supervised"),
    "vit_pretrain": ("vit_tiny", "vit_supervised"),
    "vit_mae": ("vit_tiny", "vit_supervised"),
}
PRETRAIN_KINDS = ("pretrain", "mae", "vit_pretrain", "vit_mae")  # model(x)["loss"]; the others: cross-entropy
SWEPT = ("pretrain", "mae")  # run with every decoder of DECODERS (with --decoders all); the others: the default


def build_case(kind: str, image: int, decoder: list[int] | None, overrides: dict) -> tuple[torch.nn.Module, str]:
    """The model of one case and the name of its decoder module (``""`` when it has none)."""
    from mal.models import create_encoder, create_model
    from mal.pretrain import MAEPretrainer, MALPretrainer, ObjectiveConfig

    if kind not in KINDS:
        raise ValueError(f"unknown case kind {kind!r}")
    model_name = KINDS[kind][0]
    if kind in PRETRAIN_KINDS:
        dim, depth, heads = decoder
        enc = create_encoder(model_name, image_size=image, **overrides)
        method = "mae" if kind.endswith("mae") else "ar"
        cfg = ObjectiveConfig(method=method, decoder_dim=dim, decoder_depth=depth, decoder_heads=heads)
        cls = MAEPretrainer if method == "mae" else MALPretrainer
        return cls(enc, cfg), f"{cls.__name__}.decoder"
    return create_model(model_name, image_size=image, num_classes=NUM_CLASSES, **overrides), ""


def forward_backward(model: torch.nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor, amp: bool = False) -> float:
    """One forward + backward of a case (forward and loss in bf16 autocast when ``amp``); returns the loss."""
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = model(x)["loss"] if kind in PRETRAIN_KINDS else F.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach())


def run_case(
    kind: str,
    image: int,
    decoder: list[int] | None,
    overrides: dict,
    batch: int,
    reps: int,
    device: str = "cpu",
    amp: bool = False,
) -> dict:
    """One measurement (called in a child process)."""
    from mal.engine.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    cuda = device == "cuda"
    row = {
        "kind": kind,
        "model": KINDS[kind][0],
        "encoder": "vit" if kind.startswith("vit") else "vil",
        "decoder": decoder,
        "image": image,
        "overrides": overrides,
        "batch": batch,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": "bfloat16 autocast" if amp else "float32",
        "oom": False,
    }
    try:
        model, decoder_name = build_case(kind, image, decoder, overrides)
        model.to(device).train()
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        optimizer = build_optimizer(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
        x = torch.randn(batch, 3, image, image, device=device)
        y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

        def step() -> float:
            loss = forward_backward(model, kind, x, y, amp)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            return loss

        flops, decoder_flops = _count_flops(model, kind, x, y, decoder_name, amp)
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = step()  # warm-up: allocator, optimizer state
        warmup = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        measured = ("sec_per_step", "img_per_s", "ms_per_img", "gflop_per_img", "decoder_gflop_per_img")
        row.update(dict.fromkeys(measured + ("encoder_gflop_per_img", "gflop_per_s", "loss")), oom=True)
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return row
    sec = sorted(times)[len(times) // 2]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row.update(
        warmup_s=warmup,
        sec_per_step=sec,
        step_times_s=times,
        img_per_s=batch / sec,
        ms_per_img=1000 * sec / batch,
        gflop_per_img=flops / batch / 1e9,
        decoder_gflop_per_img=decoder_flops / batch / 1e9 if decoder_name else None,
        encoder_gflop_per_img=(flops - decoder_flops) / batch / 1e9,
        gflop_per_s=flops / sec / 1e9,
        loss=loss,
        peak_rss_mb=rss,
        # the memory the table reports: allocated GPU memory on CUDA, resident memory of the process on the CPU
        peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else rss,
        peak_mem_kind="cuda_max_allocated" if cuda else "ru_maxrss",
    )
    return row


def _count_flops(
    model, kind: str, x: torch.Tensor, y: torch.Tensor, decoder_name: str, amp: bool = False
) -> tuple[float, float]:
    """FLOPs of one forward + backward, estimated as 3x the counted forward (the usual rule): the total and the
    decoder module's share. Counting the backward directly is wrong here: torch's counter prices the backward of
    a grouped (depthwise) convolution as a dense one (9 GFLOP/img of phantom work for ViL-T at 192 px), and its
    attribution of backward ops to modules is unreliable."""
    with (
        torch.no_grad(),
        torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp),
        FlopCounterMode(display=False) as counter,
    ):
        model(x)
    per_module = counter.get_flop_counts()
    decoder = sum(per_module.get(decoder_name, {}).values()) if decoder_name else 0
    return 3.0 * counter.get_total_flops(), 3.0 * decoder


def decoder_label(decoder: list[int] | None) -> str:
    return "-" if decoder is None else "{}x{}, {} heads".format(*decoder)


def case_label(row: dict) -> str:
    return row["kind"] if row["decoder"] is None else f"{row['kind']} {decoder_label(row['decoder'])}"


def ratio(row: dict, ref: dict | None, key: str) -> float | None:
    """``row[key] / ref[key]``; None when the reference step did not run (or either ran out of memory)."""
    if ref is None or row[key] is None or ref[key] is None:
        return None
    return row[key] / ref[key]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    retain_freed_memory()  # as the mal command does (docs/BENCHMARKS.md)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, help="default: 8 on the CPU, 256 on CUDA")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, help="default: 3 on the CPU, 10 on CUDA (1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 px, 1 rep, 2x2 clusters")
    p.add_argument("--cases", nargs="+", choices=list(KINDS), help="case kinds to run (default: all)")
    p.add_argument(
        "--decoders",
        choices=["all", "default"],
        default="all",
        help="pretrain and mae: all: every decoder of the sweep; default: 512x8, 16 heads only",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: JSON case description
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.one:
        case = json.loads(args.one)
        print(json.dumps(run_case(**case)))
        return

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    batch = args.batch or (256 if cuda else 8)
    image, reps = (64, 1) if args.quick else (192, args.reps or (10 if cuda else 3))
    overrides = {"layout": {"cluster_size": 2}} if args.quick else {}
    kinds = args.cases or list(KINDS)
    cases = []
    for kind in KINDS:  # run order: the reference steps first
        if kind not in kinds:
            continue
        ov = {} if kind == "supervised" else overrides  # vil_tiny: raster layout
        if kind not in PRETRAIN_KINDS:
            cases.append(dict(kind=kind, decoder=None, overrides=ov))
            continue
        decoders = DECODERS if kind in SWEPT and args.decoders == "all" else DECODERS[:1]
        cases += [dict(kind=kind, decoder=list(d), overrides=ov) for d in decoders]

    mem = "peak GPU mem" if cuda else "peak RSS"
    print(
        f"| {'case':<14} | {'model':<8} | {'decoder':<16} | {'img/s':>7} | {'ms/img':>7} | {'vs own sup.':>11} | "
        f"{'vs ViL sup.':>11} | {'GFLOP/img':>9} | {'enc+dec GFLOP':>13} | {mem:>12} |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows, refs = [], {}
    for case in cases:
        desc = dict(image=image, batch=batch, reps=reps, device=device, amp=cuda, **case)
        row = run_in_child(__file__, args.threads, desc)
        if row["kind"] in ("supervised", "vit_supervised") and not row["oom"]:
            refs[row["kind"]] = row
        # ratios to the ViL supervised step (the original key) and to the supervised step of the same encoder
        base, own = refs.get("supervised"), refs.get(KINDS[row["kind"]][1])
        row["cost_ratio_vs_supervised"] = ratio(row, base, "ms_per_img")
        row["flop_ratio_vs_supervised"] = ratio(row, base, "gflop_per_img")
        row["cost_ratio_vs_own_supervised"] = ratio(row, own, "ms_per_img")
        row["flop_ratio_vs_own_supervised"] = ratio(row, own, "gflop_per_img")
        rows.append(row)
        split = (
            f"{row['encoder_gflop_per_img']:.2f}+{row['decoder_gflop_per_img']:.2f}"
            if row["decoder_gflop_per_img"] is not None
            else "-"
        )
        speed = f"{'oom':>7} | {'oom':>7}" if row["oom"] else f"{row['img_per_s']:7.2f} | {row['ms_per_img']:7.1f}"
        print(
            f"| {row['kind']:<14} | {row['model']:<8} | {decoder_label(row['decoder']):<16} | {speed} | "
            f"{fmt(row['cost_ratio_vs_own_supervised'], '11.2f'):>11} | "
            f"{fmt(row['cost_ratio_vs_supervised'], '11.2f'):>11} | {fmt(row['gflop_per_img'], '9.2f'):>9} | "
            f"{split:>13} | {fmt(row['peak_mem_mb'], '9.0f'):>9} MB |",
            flush=True,
        )

    pretrain = [r for r in rows if r["kind"] == "pretrain" and r["cost_ratio_vs_supervised"] is not None]
    meeting = [r for r in pretrain if r["cost_ratio_vs_supervised"] <= GOAL_RATIO]
    sup, vit_sup = refs.get("supervised"), refs.get("vit_supervised")
    summary = {
        "goal_ratio": GOAL_RATIO,
        "supervised_ms_per_img": sup["ms_per_img"] if sup else None,
        "default_decoder_ratio": pretrain[0]["cost_ratio_vs_supervised"] if pretrain else None,
        "decoders_meeting_goal": [r["decoder"] for r in meeting],
        "fastest_decoder": min(pretrain, key=lambda r: r["ms_per_img"])["decoder"] if pretrain else None,
        "vit_supervised_ms_per_img": vit_sup["ms_per_img"] if vit_sup else None,
        # every case against the supervised step of its own encoder (ViL: supervised, ViT: vit_supervised)
        "cost_ratio_vs_own_supervised": {case_label(r): r["cost_ratio_vs_own_supervised"] for r in rows},
    }
    if sup and pretrain:
        print(f"\ngoal: pretraining step <= {GOAL_RATIO}x the supervised step ({sup['ms_per_img']:.1f} ms/img)")
        print(f"default decoder: {summary['default_decoder_ratio']:.2f}x")
        print("decoders meeting the goal: " + (", ".join(decoder_label(r["decoder"]) for r in meeting) or "none"))
    print()
    for r in rows:
        if r["kind"] in PRETRAIN_KINDS and r["decoder"] == list(DECODERS[0]):
            own = "the ViT supervised step" if r["encoder"] == "vit" else "the ViL supervised step"
            print(f"{r['kind']} (default decoder): {fmt(r['cost_ratio_vs_own_supervised'], '.2f')}x {own}")

    result = {
        "benchmark": "pretrain_speed",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
        },
        "settings": {
            "image": image,
            "batch": batch,
            "reps": reps,
            "quick": args.quick,
            "device": device,
            "dtype": "bfloat16 autocast" if cuda else "float32",
            "cases": [k for k in KINDS if k in kinds],
            "decoders": args.decoders,
        },
        "summary": summary,
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
