"""FLOPs and parameters of the Mask R-CNN detector on MAL-T / MAL-S backbones at MAL-v2 Table 3's input size.

    python benchmarks/detection_flops.py [--models mal_tiny mal_small] [--size 1280 800] [--threads 2] [--quick]

Counts with ``torch.utils.flop_counter.FlopCounterMode`` (PyTorch's own counter: matrix products and convolutions,
as fvcore and mmcv count; element-wise work is not counted) over one inference pass of the whole detector (encoder,
simple feature pyramid, RPN, RoI heads with 100 detections and their masks) on one image of ``--size`` (W x H,
default 1280 x 800, the paper's; torchvision's resize is set so the image passes at that size). PyTorch counts a
multiply-add as 2 FLOPs; detection tables (MMDetection's ``get_flops``) count it as 1, so both are printed, the
multiply-adds (``gmacs``) beside the paper's numbers. The encoder alone is counted too. The RoI heads' share
depends on the number of proposals, which on random weights and a random image is the RPN's full 1000. Writes
``benchmarks/results/detection_flops.json``. ``--quick``: ``mal_micro`` at 128 x 96 (a smoke test).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mal.io import write_json

RESULTS = Path(__file__).parent / "results" / "detection_flops.json"
PAPER = {"mal_tiny": {"gflops": 60.2, "params_m": 8}, "mal_small": {"gflops": 162.3, "params_m": 28}}


def count(model: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def measure(name: str, size: tuple[int, int]) -> dict:
    from mal.models import create_encoder
    from mal.tasks.detection import DetectionSettings, Detector

    w, h = size
    encoder = create_encoder(name)
    settings = DetectionSettings(min_size=[min(w, h)], max_size=max(w, h))
    det = Detector(encoder, 80, settings, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)).eval()
    image = torch.rand(3, h, w)
    t0 = time.perf_counter()
    with torch.no_grad():
        total = count(det, [image])
        enc_flops = count(lambda x: det.detector.backbone.encoder(x), image[None])
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in det.parameters())
    enc_params = sum(p.numel() for p in det.encoder.parameters())
    row = {
        "model": name, "size": [w, h], "gflops": total / 1e9, "gmacs": total / 2e9, "encoder_gmacs": enc_flops / 2e9,
        "params_m": params / 1e6, "encoder_params_m": enc_params / 1e6, "seconds": seconds,
    }  # fmt: skip
    if name in PAPER:
        row["paper_gflops"], row["paper_params_m"] = PAPER[name]["gflops"], PAPER[name]["params_m"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mal_tiny", "mal_small"])
    ap.add_argument("--size", nargs=2, type=int, default=[1280, 800], metavar=("W", "H"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models, size = (["mal_micro"], (128, 96)) if args.quick else (args.models, tuple(args.size))
    rows = [measure(m, size) for m in models]
    print(f"Mask R-CNN at {size[0]} x {size[1]} (one image, inference, FlopCounterMode; MACs = FLOPs / 2)")
    print("| model | GMACs (detector) | paper 'GFLOPs' | GMACs (encoder) | params (M) | paper params (M) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['gmacs']:.1f} | {r.get('paper_gflops', '-')} | {r['encoder_gmacs']:.1f} | "
              f"{r['params_m']:.1f} | {r.get('paper_params_m', '-')} |")  # fmt: skip
    settings = {"size": list(size), "threads": args.threads, "quick": args.quick, "torch": torch.__version__,
                "machine": platform.machine()}  # fmt: skip
    write_json(args.out, {"benchmark": "detection_flops", "settings": settings, "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
