"""Data loading: decoded + augmented training images per second per loader worker, from a folder of JPEGs.

    python benchmarks/data_loading.py [--images 3000] [--workers 1 2] [--size 224] [--batch 64] [--target 2000]
        [--folder PATH] [--quick]

Generates an ImageNet-like folder (``--images`` JPEGs, quality 90, sizes around ImageNet's: 500x375, 375x500,
500x333, 500x500, 640x480 and random 300-800 px sides; smooth shapes and grain, so the files weigh about what
ImageNet's do) in a temporary folder, or in ``--folder`` (kept there; a folder with ``train/`` is read as it is),
then runs the training split through the real loader path (``ImageFolderDataset`` with ``SampleAugment``,
``StepSampler`` keys with per-sample seeds, ``DataLoader`` with ``collate``) for each worker count and recipe:

- ``finetune``: the MAE / DeiT fine-tuning recipe: RandomResizedCrop (scale 0.08-1) from the full image to
  ``--size``, RandAugment ``rand-m9-mstd0.5``, per sample in the workers;
- ``pretrain``: the MAE / MAL pretraining crop: RandomResizedCrop (scale 0.2-1), no RandAugment.

Flip, normalization and random erasing run later on the batch on the training device; their cost on the CPU is
timed apart (``batch_ops``). A case is timed in steady state: from the batch after the loader's first
``2 x workers`` (its prefetch), so worker start-up is left out. ``per_sample_ms`` times the stages in this process
(one thread), in wall and CPU time: decode, + crop and resize, + RandAugment. The summary sizes the workers from
the CPU time of the whole per-sample transform, which other load on the machine barely changes: ``img_per_s_per_core``
(a worker with a core to itself) and the workers that feed ``--target`` images/s (one core each); the loader rows
are what the workers delivered on the machine as it was.
``--quick`` (the smoke test): 48 small images, 0 and 1 workers, 2 batches of 8.

Prints a markdown table and writes ``benchmarks/results/data_loading.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader

from mal.data import BatchAugment, ImageFolderDataset, SampleAugment, collate
from mal.data.common import decode_image
from mal.engine import StepSampler
from mal.io import write_json

RESULTS = Path(__file__).parent / "results" / "data_loading.json"
RECIPES = {
    "finetune": {"scale": (0.08, 1.0), "randaugment": "rand-m9-mstd0.5", "erase_prob": 0.25},
    "pretrain": {"scale": (0.2, 1.0), "randaugment": None, "erase_prob": 0.0},
}
IMAGENET_SIZES = [(500, 375), (375, 500), (500, 333), (500, 500), (640, 480)]


def synthetic_jpeg(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A photo-like test image: a smooth colour field, a few blurred shapes, sensor-like grain."""
    w, h = size
    field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    grain = rng.normal(0, 10, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def make_folder(root: Path, n: int, quick: bool, seed: int = 0) -> None:
    """``n`` JPEGs in ``root/train/<10 classes>/``."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        if quick:
            size = (int(rng.integers(48, 96)), int(rng.integers(48, 96)))
        elif rng.random() < 0.7:
            size = IMAGENET_SIZES[int(rng.integers(len(IMAGENET_SIZES)))]
        else:
            size = (int(rng.integers(300, 801)), int(rng.integers(300, 801)))
        folder = root / "train" / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        synthetic_jpeg(rng, size).save(folder / f"{i:05d}.jpg", quality=90)


def folder_stats(paths: list[str]) -> dict:
    """Count, mean file size (kB) and mean megapixels of ``paths`` (sizes from the headers)."""
    pixels = []
    for p in paths:
        with Image.open(p) as img:
            pixels.append(img.width * img.height)
    kb = [os.path.getsize(p) / 1024 for p in paths]
    return {"images": len(paths), "mean_kb": statistics.fmean(kb), "mean_megapixels": statistics.fmean(pixels) / 1e6}


def transform(recipe: str, size: int) -> SampleAugment:
    r = RECIPES[recipe]
    return SampleAugment(size, scale=r["scale"], ratio=(3 / 4, 4 / 3), randaugment=r["randaugment"])


def loader_rate(ds: ImageFolderDataset, workers: int, batch: int, batches: int) -> dict:
    """Images/s through a DataLoader in steady state (after the prefetch of ``2 x workers`` batches)."""
    sampler = StepSampler(len(ds), batch, seed=0, sample_seeds=True)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate)
    skip = 2 * workers if workers else 1
    t_start = time.perf_counter()
    t0, counted, n = None, 0, 0
    for n, out in enumerate(loader, 1):
        if n == skip:
            t0 = time.perf_counter()
        elif n > skip:
            counted += out["images"].shape[0]
        if n >= skip + batches:
            break
    t1 = time.perf_counter()
    if t0 is None or counted == 0:
        raise SystemExit(f"too few images for {workers} workers: need {(skip + batches) * batch}")
    rate = counted / (t1 - t0)
    return {"img_per_s": rate, "img_per_s_per_worker": rate / max(workers, 1), "startup_s": t0 - t_start,
            "timed_images": counted}  # fmt: skip


def per_sample_ms(paths: list[str], recipe: str, size: int) -> dict[str, dict[str, float]]:
    """Wall and CPU milliseconds per image in this process (one thread) for each stage of a worker's work."""
    r = RECIPES[recipe]
    crop = SampleAugment(size, scale=r["scale"], ratio=(3 / 4, 4 / 3))
    stages = {"decode": lambda p, i: decode_image(p), "decode + crop + resize": lambda p, i: crop(decode_image(p), i)}
    if r["randaugment"] is not None:
        full = transform(recipe, size)
        stages["decode + crop + resize + RandAugment"] = lambda p, i: full(decode_image(p), i)
    out = {}
    for name, fn in stages.items():
        fn(paths[0], 0)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        for i, p in enumerate(paths):
            fn(p, i)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        out[name] = {"wall": 1000 * wall / len(paths), "cpu": 1000 * cpu / len(paths)}
    return out


def batch_ops_rate(size: int, batch: int, erase_prob: float, reps: int) -> float:
    """Images/s of the batch side (flip, normalize, erasing) on this CPU: on the GPU it is a few kernels."""
    aug = BatchAugment(size, train=True, mean=(0.5,) * 3, std=(0.25,) * 3, crop=False, erase_prob=erase_prob)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    aug(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        aug(x)
    return reps * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="default: 1 .. CPU count")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--batches", type=int, default=None, help="timed batches per case (default: what --images allows)"
    )
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--target", type=float, default=2000.0, help="img/s the GPU consumes (ViL-T training)")
    parser.add_argument(
        "--folder",
        default=None,
        help="an ImageFolder root (train/<class>/...) to read; generated there and kept when it has no train/",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (workers use 1)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--quick", action="store_true", help="48 small images, 0 and 1 workers, 2 batches of 8")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.quick:
        args.images, args.batch, args.batches, args.size = 48, 8, 2, 32
        args.workers = args.workers or [0, 1]
    workers = args.workers or list(range(1, cpus + 1))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.folder or tmp)
        generated = not (root / "train").is_dir()
        if generated:  # (kept when --folder names the place)
            make_folder(root, args.images, args.quick)
        folder = {"path": args.folder, "generated": generated}
        folder |= folder_stats([p for p, _ in ImageFolderDataset(root, "train").samples])
        rows = []
        for recipe in args.recipes:
            ds = ImageFolderDataset(root, "train", transform=transform(recipe, args.size))
            for w in workers:
                need = 2 * w if w else 1
                batches = args.batches or len(ds) // args.batch - need
                if batches < 1:
                    raise SystemExit(f"--images {len(ds)} is too few for {w} workers at batch {args.batch}")
                rows.append({"recipe": recipe, "workers": w, **loader_rate(ds, w, args.batch, batches)})
                r = rows[-1]
                print(f"{recipe}: {w} workers: {r['img_per_s']:.0f} img/s ({r['img_per_s_per_worker']:.0f} per worker)",
                      flush=True)  # fmt: skip
        paths = [p for p, _ in ImageFolderDataset(root, "train").samples[: 16 if args.quick else 200]]
        stages = {rec: per_sample_ms(paths, rec, args.size) for rec in args.recipes}
        batch_ops = {rec: batch_ops_rate(args.size, args.batch, RECIPES[rec]["erase_prob"], 2 if args.quick else 10)
                     for rec in args.recipes}  # fmt: skip

    summary = {}
    for recipe in args.recipes:
        full = stages[recipe][list(stages[recipe])[-1]]  # the whole per-sample transform
        one = [r["img_per_s"] for r in rows if r["recipe"] == recipe and r["workers"] == 1]
        summary[recipe] = {
            "cpu_ms_per_image": full["cpu"],
            "img_per_s_per_core": 1000 / full["cpu"],  # what a worker with a core to itself does
            "workers_for_target": math.ceil(args.target * full["cpu"] / 1000),
            "loader_img_per_s_one_worker": one[0] if one else None,  # as measured, other load included
            "ms_per_image": stages[recipe],
            "batch_ops_img_per_s_cpu": batch_ops[recipe],
        }
    result = {
        "benchmark": "data_loading",
        "machine": {
            "platform": platform.platform(),
            "cpus": cpus,
            "torch": torch.__version__,
            "threads": args.threads,
            "processor": platform.processor(),
        },  # fmt: skip
        "settings": {
            "quick": args.quick,
            "size": args.size,
            "batch": args.batch,
            "workers": workers,
            "recipes": {k: RECIPES[k] for k in args.recipes},
            "target": args.target,
        },  # fmt: skip
        "folder": folder,
        "rows": rows,
        "summary": summary,
    }
    print()
    print(f"{folder['images']} JPEGs, mean {folder['mean_kb']:.0f} kB, {folder['mean_megapixels']:.3f} MP; "
          f"{args.size} px, batch {args.batch}, {cpus} CPUs")  # fmt: skip
    print("| recipe | workers | img/s | img/s per worker | start-up s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['recipe']} | {r['workers']} | {r['img_per_s']:.0f} | {r['img_per_s_per_worker']:.0f} | "
              f"{r['startup_s']:.2f} |")  # fmt: skip
    for recipe, s in summary.items():
        stages_txt = ", ".join(f"{k} {v['wall']:.2f} ({v['cpu']:.2f} CPU)" for k, v in s["ms_per_image"].items())
        print(f"{recipe}: {s['cpu_ms_per_image']:.2f} CPU ms per image = {s['img_per_s_per_core']:.0f} img/s per "
              f"core -> {s['workers_for_target']} workers for {args.target:.0f} img/s; ms per image in one "
              f"process: {stages_txt}; batch ops on this CPU {s['batch_ops_img_per_s_cpu']:.0f} img/s")  # fmt: skip
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
