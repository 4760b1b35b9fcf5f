"""Training-step throughput: the MAL pretraining step against the supervised step of the same encoder.

    python benchmarks/pretrain_speed.py [--batch 8] [--threads 2] [--reps 3] [--quick]

Cases (ViL-T at 192 px, float32, CPU):

- ``pretrain``: ``MALPretrainer(create_encoder("mal_tiny"), ObjectiveConfig(decoder_dim, decoder_depth,
  decoder_heads))`` (4x4 clusters, alternating schedule, encoder in cluster-causal ``pretrain`` mode), one step
  ``loss.backward(); optimizer.step(); optimizer.zero_grad()``, for the default decoder (512 wide, 8 blocks,
  16 heads) and smaller ones;
- ``supervised``: ``create_model("vil_tiny")`` (raster layout, 1000 classes), forward + cross-entropy + backward
  + optimizer step; the reference of the cost ratio (the goal: a pretraining step costs at most 1.6x this);
- ``finetune``: ``create_model("mal_tiny")`` (the MAL layout, ``finetune`` mode), the same supervised step.

Every step uses AdamW on the training code's parameter groups (``mal.engine.optim``). A step is timed after one
warm-up step; the median of ``--reps`` steps is reported. Each case runs in a fresh subprocess, so its peak
resident memory (ru_maxrss) is its own. FLOPs of one forward + backward are 3x the forward's as counted by
``torch.utils.flop_counter`` (matmuls, convs and attention; elementwise work and the optimizer are not counted);
for ``pretrain`` the decoder's share is counted apart (the rest is the encoder). ``--quick`` is a smoke test: 64 px,
1 rep, and 2x2 clusters for the MAL layout (4x4 clusters of 16 px patches would leave a single unit at
64 px, i.e. nothing to predict). Writes ``benchmarks/results/pretrain_speed.json`` (atomically) and prints a table.
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

RESULTS = Path(__file__).parent / "results" / "pretrain_speed.json"
# (decoder_dim, decoder_depth, decoder_heads): the default of ObjectiveConfig first, then smaller decoders
DECODERS = [(512, 8, 16), (512, 4, 16), (384, 4, 12), (256, 4, 8), (256, 2, 8)]
GOAL_RATIO = 1.6  # the goal: pretraining step cost <= 1.6x the supervised forward + backward
NUM_CLASSES = 1000


def build_case(kind: str, image: int, decoder: list[int] | None, overrides: dict) -> tuple[torch.nn.Module, str]:
    """The model of one case and the name of its decoder module (``""`` when it has none)."""
    from mal.models import create_encoder, create_model
    from mal.pretrain import MALPretrainer, ObjectiveConfig

    if kind == "pretrain":
        dim, depth, heads = decoder
        enc = create_encoder("mal_tiny", image_size=image, **overrides)
        cfg = ObjectiveConfig(decoder_dim=dim, decoder_depth=depth, decoder_heads=heads)
        return MALPretrainer(enc, cfg), "MALPretrainer.decoder"
    if kind == "supervised":
        return create_model("vil_tiny", image_size=image, num_classes=NUM_CLASSES), ""
    if kind == "finetune":
        return create_model("mal_tiny", image_size=image, num_classes=NUM_CLASSES, **overrides), ""
    raise ValueError(f"unknown case kind {kind!r}")


def forward_backward(model: torch.nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor) -> float:
    """One forward + backward of a case; returns the loss."""
    loss = model(x)["loss"] if kind == "pretrain" else F.cross_entropy(model(x), y)
    loss.backward()
    return float(loss)


def run_case(kind: str, image: int, decoder: list[int] | None, overrides: dict, batch: int, reps: int) -> dict:
    """One measurement (called in a child process)."""
    from mal.engine.optim import build_optimizer, param_groups

    torch.manual_seed(0)
    model, decoder_name = build_case(kind, image, decoder, overrides)
    model.train()
    optimizer = build_optimizer(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    x = torch.randn(batch, 3, image, image)
    y = torch.randint(0, NUM_CLASSES, (batch,))

    def step() -> float:
        loss = forward_backward(model, kind, x, y)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    flops, decoder_flops = _count_flops(model, kind, x, y, decoder_name)
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = step()  # warm-up: allocator, optimizer state
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "kind": kind,
        "model": "mal_tiny" if kind != "supervised" else "vil_tiny",
        "decoder": decoder,
        "image": image,
        "overrides": overrides,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": batch,
        "warmup_s": warmup,
        "sec_per_step": sec,
        "step_times_s": times,
        "img_per_s": batch / sec,
        "ms_per_img": 1000 * sec / batch,
        "gflop_per_img": flops / batch / 1e9,
        "decoder_gflop_per_img": decoder_flops / batch / 1e9 if decoder_name else None,
        "encoder_gflop_per_img": (flops - decoder_flops) / batch / 1e9,
        "gflop_per_s": flops / sec / 1e9,
        "loss": loss,
        "peak_rss_mb": peak / 1024,
    }


def _count_flops(model, kind: str, x: torch.Tensor, y: torch.Tensor, decoder_name: str) -> tuple[float, float]:
    """FLOPs of one forward + backward, estimated as 3x the counted forward (the usual rule): the total and the
    decoder module's share. Counting the backward directly is wrong here: torch's counter prices the backward of
    a grouped (depthwise) convolution as a dense one (9 GFLOP/img of phantom work for ViL-T at 192 px), and its
    attribution of backward ops to modules is unreliable."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    per_module = counter.get_flop_counts()
    decoder = sum(per_module.get(decoder_name, {}).values()) if decoder_name else 0
    return 3.0 * counter.get_total_flops(), 3.0 * decoder


def decoder_label(decoder: list[int] | None) -> str:
    return "-" if decoder is None else "{}x{}, {} heads".format(*decoder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke test: 64 px, 1 rep, 2x2 clusters")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: JSON case description
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.one:
        case = json.loads(args.one)
        print(json.dumps(run_case(**case)))
        return

    image, reps = (64, 1) if args.quick else (192, args.reps)
    overrides = {"cluster_size": 2} if args.quick else {}
    cases = [
        dict(kind="supervised", decoder=None, overrides={}),
        dict(kind="finetune", decoder=None, overrides=overrides),
    ]
    cases += [dict(kind="pretrain", decoder=list(d), overrides=overrides) for d in DECODERS]

    print(
        f"{'case':<10} | {'decoder':<16} | {'img/s':>6} | {'ms/img':>7} | {'ratio':>5} | {'GFLOP/img':>9} | "
        f"{'enc+dec GFLOP':>13} | {'peak RSS':>8}"
    )
    rows = []
    for case in cases:
        row = run_in_child(__file__, args.threads, dict(image=image, batch=args.batch, reps=reps, **case))
        base = rows[0] if rows else row  # the supervised vil_tiny step runs first: the reference
        row["cost_ratio_vs_supervised"] = row["ms_per_img"] / base["ms_per_img"]
        row["flop_ratio_vs_supervised"] = row["gflop_per_img"] / base["gflop_per_img"]
        rows.append(row)
        split = (
            f"{row['encoder_gflop_per_img']:.2f}+{row['decoder_gflop_per_img']:.2f}"
            if row["decoder_gflop_per_img"] is not None
            else "-"
        )
        print(
            f"{row['kind']:<10} | {decoder_label(row['decoder']):<16} | {row['img_per_s']:6.2f} | "
            f"{row['ms_per_img']:7.1f} | {row['cost_ratio_vs_supervised']:5.2f} | {row['gflop_per_img']:9.2f} | "
            f"{split:>13} | {row['peak_rss_mb']:5.0f} MB",
            flush=True,
        )

    pretrain = [r for r in rows if r["kind"] == "pretrain"]
    meeting = [r for r in pretrain if r["cost_ratio_vs_supervised"] <= GOAL_RATIO]
    summary = {
        "goal_ratio": GOAL_RATIO,
        "supervised_ms_per_img": rows[0]["ms_per_img"],
        "default_decoder_ratio": pretrain[0]["cost_ratio_vs_supervised"],
        "decoders_meeting_goal": [r["decoder"] for r in meeting],
        "fastest_decoder": min(pretrain, key=lambda r: r["ms_per_img"])["decoder"],
    }
    print(f"\ngoal: pretraining step <= {GOAL_RATIO}x the supervised step ({rows[0]['ms_per_img']:.1f} ms/img)")
    print(f"default decoder: {summary['default_decoder_ratio']:.2f}x")
    print("decoders meeting the goal: " + (", ".join(decoder_label(r["decoder"]) for r in meeting) or "none"))

    result = {
        "benchmark": "pretrain_speed",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "settings": {"image": image, "batch": args.batch, "reps": reps, "quick": args.quick},
        "summary": summary,
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
