"""Shared by several test modules (``pythonpath = ["tests"]`` in pyproject.toml)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mal.tokens import LayoutConfig

#: The repository (configs/, benchmarks/) and the test fixtures (the official ViL reference).
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

LAYOUT_FIELDS = {f.name for f in dataclasses.fields(LayoutConfig)}


def with_layout(kw: dict[str, Any]) -> dict[str, Any]:
    """Model overrides with the layout options (``cluster_size=2``, ...) gathered under ``layout``."""
    layout = {k: kw[k] for k in kw if k in LAYOUT_FIELDS}
    out = {k: v for k, v in kw.items() if k not in LAYOUT_FIELDS}
    return {**out, "layout": layout} if layout else out


# -- tiny training runs -----------------------------------------------------------------------------------------

# a model small enough for many short runs: 16 px digits, 4x4 patches, 2x2 clusters (4 clusters of 4 tokens)
TINY = [
    "model.name=mal_micro",
    "model.overrides.dim=32",
    "model.overrides.depth=1",
    "model.overrides.num_heads=2",
    "objective.decoder_dim=32",
    "objective.decoder_depth=1",
    "objective.decoder_heads=2",
    "data.image_size=16",
    "data.load_size=16",
    "optim.batch_size=16",
    "optim.warmup_epochs=0",
    "optim.blr=5e-3",
    "run.progress=false",
    "run.tensorboard=false",
    "run.image_every=null",
    "run.log_every=1",
    "run.threads=1",
]


def tiny(tmp_path: Path, *overrides: str, name: str = "run"):  # noqa: ANN201 (a PretrainConfig)
    """A tiny pretraining config writing to ``tmp_path / name``."""
    from mal.pretrain.task import load_pretrain_config

    return load_pretrain_config(None, [*TINY, f"run.out_dir={tmp_path / name}", *overrides])


def image_folder(root: Path, n_good: int, n_bad: int) -> Path:
    """An ImageFolder ``root/{train,val}/{a,b}/`` of 20 px PNGs, with ``n_bad`` unreadable files per train class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n_good):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
            for i in range(n_bad if split == "train" else 0):
                (d / f"bad{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


# -- dense datasets in their real on-disk formats ---------------------------------------------------------------

NYU_SHAPE = (6, 24, 32)  # samples, height, width; stored MATLAB-style as (N, 3, W, H)


def nyu_arrays():  # noqa: ANN201 (three arrays)
    """The NYU fixture's samples in (H, W) orientation: an asymmetric image, depth and raw labels 0..4."""
    import numpy as np

    n_img, h, w = NYU_SHAPE
    n, c, y, x = np.meshgrid(np.arange(n_img), np.arange(3), np.arange(h), np.arange(w), indexing="ij")
    image = ((7 * x + 3 * y + 11 * n + 50 * c) % 256).astype(np.uint8)  # (N, 3, H, W)
    depth = (1.0 + 0.1 * x[:, 0] + 0.01 * y[:, 0] + n[:, 0]).astype(np.float32)  # (N, H, W)
    labels = ((x[:, 0] // 4 + y[:, 0] // 6 + n[:, 0]) % 5).astype(np.uint16)  # (N, H, W), 0 = unlabeled
    return image, depth, labels


def nyu_file(path: Path) -> Path:
    """``nyu_depth_v2_labeled.mat`` (HDF5, MATLAB's reversed axes) holding :func:`nyu_arrays`."""
    import h5py

    image, depth, labels = nyu_arrays()
    with h5py.File(path, "w") as f:
        f["images"] = image.transpose(0, 1, 3, 2)  # (N, 3, W, H)
        f["depths"] = depth.transpose(0, 2, 1).astype("f8")
        f["labels"] = labels.transpose(0, 2, 1)
    return path


def _jpeg(arr) -> bytes:  # noqa: ANN001 (a uint8 array)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def ade_folder(root: Path) -> Path:
    """``ADEChallengeData2016`` with 3 training pairs of different sizes (one JPEG corrupt) and 1 validation pair."""
    import numpy as np
    from PIL import Image

    for sub in ("training", "validation"):
        (root / "images" / sub).mkdir(parents=True)
        (root / "annotations" / sub).mkdir(parents=True)
    tr_img, tr_ann = root / "images" / "training", root / "annotations" / "training"
    # a: 64 wide x 32 high; annotation 1 | 2 | 3 in column thirds, image red | green | blue
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :16, 0] = img[:, 16:48, 1] = img[:, 48:, 2] = 255
    ann = np.full((32, 64), 2, np.uint8)
    ann[:, :16], ann[:, 48:] = 1, 3
    (tr_img / "ADE_a.jpg").write_bytes(_jpeg(img))
    Image.fromarray(ann).save(tr_ann / "ADE_a.png")
    # b: 20 wide x 40 high; annotation 0 (other) on top, 150 below
    ann = np.zeros((40, 20), np.uint8)
    ann[20:] = 150
    (tr_img / "ADE_b.jpg").write_bytes(_jpeg(np.random.default_rng(0).integers(0, 256, (40, 20, 3), np.uint8)))
    Image.fromarray(ann).save(tr_ann / "ADE_b.png")
    # c: a corrupt JPEG with a valid annotation
    (tr_img / "ADE_c.jpg").write_bytes(np.random.default_rng(1).bytes(300))
    Image.fromarray(np.ones((30, 30), np.uint8)).save(tr_ann / "ADE_c.png")
    (root / "images" / "validation" / "ADE_v.jpg").write_bytes(_jpeg(np.zeros((24, 24, 3), np.uint8)))
    Image.fromarray(np.full((24, 24), 7, np.uint8)).save(root / "annotations" / "validation" / "ADE_v.png")
    return root


def png16(path: Path, arr: Any) -> Path:
    """A 16-bit PNG of ``arr`` uint16 ``(H, W, C)``, written by hand: PIL cannot write 16-bit colour."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, c = arr.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]  # gray, gray + alpha, RGB, RGBA
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


#: The Synapse fixture: training cases and slices, test cases with their depth (slices of 24 x 20 px)
SYNAPSE_SHAPE = (24, 20)
SYNAPSE_TRAIN = {"case0005": 3, "case0006": 2}
SYNAPSE_TEST = {"case0001": 4, "case0002": 3}


def synapse_slice(case: int, k: int):  # noqa: ANN201 (two arrays)
    """Image (float32 in [0, 1], asymmetric) and label (uint8, ids 0..8 in bands) of slice ``k`` of case ``case``."""
    import numpy as np

    h, w = SYNAPSE_SHAPE
    y, x = np.mgrid[0:h, 0:w]
    image = ((x + 2 * y + 5 * k + 7 * case) % 32 / 31).astype(np.float32)
    label = ((x // 3 + k + case) % 9).astype(np.uint8)
    label[: 1 + k % 3] = 0  # a background band of varying height
    return image, label


def synapse_folder(root: Path, *, lists: bool = True) -> Path:
    """TransUNet's Synapse release under ``root``: ``train_npz/<case>_slice<k>.npz`` (:data:`SYNAPSE_TRAIN`),
    ``test_vol_h5/<case>.npy.h5`` (:data:`SYNAPSE_TEST`, slices of :func:`synapse_slice` stacked) and, with
    ``lists``, ``lists/lists_Synapse/{train,test_vol}.txt`` (the test list in a non-sorted order)."""
    import h5py
    import numpy as np

    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    train_names = []
    for case, n in SYNAPSE_TRAIN.items():
        for k in range(n):
            image, label = synapse_slice(int(case[4:]), k)
            name = f"{case}_slice{k:03d}"
            np.savez(root / "train_npz" / f"{name}.npz", image=image, label=label)
            train_names.append(name)
    for case, n in SYNAPSE_TEST.items():
        image, label = zip(*(synapse_slice(int(case[4:]), k) for k in range(n)), strict=True)
        with h5py.File(root / "test_vol_h5" / f"{case}.npy.h5", "w") as f:
            f["image"], f["label"] = np.stack(image), np.stack(label)
    if lists:
        d = root / "lists" / "lists_Synapse"
        d.mkdir(parents=True)
        (d / "train.txt").write_text("".join(f"{n}\n" for n in train_names))
        (d / "test_vol.txt").write_text("".join(f"{c}\n" for c in reversed(list(SYNAPSE_TEST))))
    return root
