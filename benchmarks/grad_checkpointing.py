"""Activation memory and step time of MAL pretraining with and without gradient checkpointing
(``model.set_grad_checkpointing()``: each encoder block's activations recomputed in the backward).

    python benchmarks/grad_checkpointing.py [--models mal_tiny mal_base] [--batch 2] [--threads 2] [--quick]

Activation memory is counted exactly, whatever the device: the bytes of every tensor autograd keeps from the forward
for the backward (``torch.autograd.graph.saved_tensors_hooks``; with checkpointing the backward then holds one
block's recomputed activations at a time, not counted), parameters left out and each storage counted once, in one
pretraining step of ``MALPretrainer`` (the paper's decoder: width 512, depth 8, 16 heads) at the model's preset
resolution (192 px), float32. It grows linearly with the batch, so the table also gives it per image and at batch 64
(MAL-v2 reports about 35 GB per GPU for MAL-B pretraining at batch 64, which includes weights, optimizer state and
the allocator's overhead, in bf16 autocast: not the same count). The step time (forward + backward, CPU) shows the
price. Writes ``benchmarks/results/grad_checkpointing.json``. ``--quick``: ``mal_micro`` with a small decoder.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from mal.io import write_json

RESULTS = Path(__file__).parent / "results" / "grad_checkpointing.json"
DECODER = dict(decoder_dim=512, decoder_depth=8, decoder_heads=16)


def measure(name: str, batch: int, checkpointing: bool, decoder: dict) -> dict:
    from mal.models import create_encoder
    from mal.pretrain import MALPretrainer, ObjectiveConfig

    torch.manual_seed(0)
    encoder = create_encoder(name)
    model = MALPretrainer(encoder, ObjectiveConfig(**decoder)).train()
    model.encoder.set_grad_checkpointing(checkpointing)
    size = encoder.cfg.image_size
    x = torch.randn(batch, encoder.cfg.in_chans, size, size)
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[(ptr, t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x)["loss"]
    loss.backward()
    seconds = time.perf_counter() - t0
    enc_params = sum(p.numel() for p in model.encoder.parameters())
    saved = sum(seen.values())
    return {
        "model": name, "image": size, "batch": batch, "checkpointing": checkpointing,
        "activation_mb": saved / 2**20, "activation_mb_per_image": saved / 2**20 / batch,
        "activation_gb_at_batch_64": saved / 2**30 / batch * 64, "step_seconds": seconds,
        "encoder_params_m": enc_params / 1e6,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mal_tiny", "mal_base"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models, decoder = (["mal_micro"], dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)) if args.quick else (
        args.models, DECODER)  # fmt: skip
    rows = [measure(m, args.batch, c, decoder) for m in models for c in (False, True)]
    print(f"MAL pretraining step, batch {args.batch}, float32: activations kept for the backward")
    print("| model | checkpointing | activations (MB) | per image (MB) | at batch 64 (GB) | step (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mode = "on" if r["checkpointing"] else "off"
        print(f"| {r['model']} | {mode} | {r['activation_mb']:.0f} | {r['activation_mb_per_image']:.0f} | "
              f"{r['activation_gb_at_batch_64']:.1f} | {r['step_seconds']:.2f} |")  # fmt: skip
    result = {
        "benchmark": "grad_checkpointing",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "settings": {"models": models, "batch": args.batch, "quick": args.quick, "decoder": decoder},
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
