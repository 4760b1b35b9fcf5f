"""NYU Depth v2, the labeled set (``nyu_depth_v2_labeled.mat``, HDF5): RGB, depth in metres and raw class labels."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mal.data.common import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DenseDataset,
    DenseTarget,
    as_hw,
    random_subset,
    resize_dense,
)

NYU_SPLITS = ("train", "test")
NYU_NUM_CLASSES = 894  # raw labels 1..894 of the labeled set; 0 is unlabeled
NYU_MAX_DEPTH = 10.0
_NYU_SPLIT_SEED = 0
_NYU_TRAIN_FRACTION = 795 / 1449  # the official split's proportion


def _h5py():  # noqa: ANN202
    """``h5py``, an optional dependency: the NYUv2 file is HDF5 (``pip install "mal-vision[dense]"``)."""
    try:
        import h5py
    except ImportError:
        raise ImportError('reading NYUv2 needs h5py and scipy: pip install "mal-vision[dense]"') from None
    return h5py


def _nyu_names(f: Any) -> tuple[str, ...] | None:
    """The class names of the MATLAB cell array ``names`` (references to uint16 char arrays), if readable."""
    if "names" not in f:
        return None
    try:
        return tuple("".join(map(chr, np.asarray(f[ref]).ravel())) for ref in np.asarray(f["names"]).ravel())
    except (KeyError, TypeError, ValueError, OSError):
        return None


def _load_class_map(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class map not found: {path}")
    values = np.asarray(json.loads(path.read_text()) if path.suffix.lower() == ".json" else np.load(path))
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer) or len(values) == 0:
        raise ValueError(f"class map {path} must be a 1-d list of integer class ids indexed by raw label")
    if (values < 0).any() or (values > IGNORE_INDEX).any():
        raise ValueError(f"class map {path} holds ids outside 0..{IGNORE_INDEX}")
    return values.astype(np.int64)


class NYUDepthV2Dataset(DenseDataset):
    """NYU Depth v2 labeled set: ``root`` is the path of ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5).

    The file stores MATLAB's axes reversed (``images`` ``(N, 3, 640, 480)`` uint8, ``depths`` ``(N, 640, 480)`` in
    metres, ``labels`` ``(N, 640, 480)`` uint16 with 0 = unlabeled); samples come back as ``(3, 480, 640)`` /
    ``(480, 640)`` resized to ``load_size`` (image bilinear antialiased, depth and mask nearest).

    Splits ``train`` and ``test`` (``val`` is an alias of ``test``): the official ``splits.mat`` (``trainNdxs``,
    ``testNdxs``, 1-based) when a file of that name lies next to ``root``, else a fixed seeded permutation with the
    official 795/1449 train proportion; ``split_source`` (and ``repr``) says which. Masks: raw label 0 -> 255 and
    ``k -> k - 1`` (894 classes), or ``class_map`` (a ``.json`` list or ``.npy`` array indexed by raw label giving the
    class id or 255; raw labels past its end are ignored) when ``segmentation=True``; by default (MAL-v1 takes
    segmentation from ADE20K, not from NYU's 894 raw classes) the masks are all 255 and only depth is labelled.

    The file is opened lazily, once per process, so DataLoader workers each get their own handle.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        load_size: int | tuple[int, int] | None = (240, 320),
        segmentation: bool = False,
        class_map: str | os.PathLike | None = None,
        label_fraction: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ):
        split = "test" if split == "val" else split
        if split not in NYU_SPLITS:
            raise ValueError(f"unknown NYU Depth v2 split {split!r}; valid splits: train, test (val = test)")
        path = Path(root)
        if not path.is_file():
            raise FileNotFoundError(f"NYU Depth v2 file not found: {path} (expected nyu_depth_v2_labeled.mat)")
        try:
            f = _h5py().File(path, "r")
        except OSError as e:
            raise ValueError(f"{path} is not a MATLAB v7.3 (HDF5) file: {e}") from e
        with f:
            needed = ("images", "depths", "labels") if segmentation else ("images", "depths")
            missing = [k for k in needed if k not in f]
            if missing:
                raise ValueError(f"{path} has no {', '.join(missing)}; is it nyu_depth_v2_labeled.mat?")
            n, c, w, h = f["images"].shape
            if c != 3 or any(f[k].shape != (n, w, h) for k in needed[1:]):
                raise ValueError(f"unexpected shapes in {path}: " + ", ".join(f"{k} {f[k].shape}" for k in needed))
            names = _nyu_names(f) if segmentation and class_map is None else None

        splits_path = path.parent / "splits.mat"
        if splits_path.is_file():
            try:
                from scipy.io import loadmat
            except ImportError:
                raise ImportError('reading NYUv2 splits needs scipy: pip install "mal-vision[dense]"') from None

            mat = loadmat(splits_path)
            key = "trainNdxs" if split == "train" else "testNdxs"
            indices = np.asarray(mat[key]).ravel().astype(np.int64) - 1
            if len(indices) and (indices.min() < 0 or indices.max() >= n):
                raise ValueError(f"{splits_path}: {key} has indices outside 1..{n}")
            self.split_source = str(splits_path)
        else:
            perm = np.random.default_rng(_NYU_SPLIT_SEED).permutation(n)
            n_train = min(max(1, round(n * _NYU_TRAIN_FRACTION)), n - 1) if n > 1 else n
            indices = np.sort(perm[:n_train] if split == "train" else perm[n_train:])
            self.split_source = "seeded"

        lut = np.full(1 << 16, IGNORE_INDEX, dtype=np.int64)  # raw uint16 label -> class id
        if class_map is not None:
            values = _load_class_map(class_map)
            lut[: len(values)] = values[: len(lut)]
            kept = values[values != IGNORE_INDEX]
            num_classes = int(kept.max()) + 1 if len(kept) else 0
            classes = tuple(f"class_{k}" for k in range(num_classes))
        else:
            classes = names if names else tuple(f"class_{k}" for k in range(NYU_NUM_CLASSES))
            num_classes = len(classes)
            lut[1 : num_classes + 1] = np.arange(num_classes)

        self.root = str(path)
        self.split = split
        self.load_size = as_hw((240, 320) if load_size is None else load_size)
        self.label_fraction = float(label_fraction)
        self.indices = indices[random_subset(len(indices), label_fraction, seed)]
        self.classes = classes
        self.num_classes = num_classes
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.has_depth, self.has_seg = True, bool(segmentation)
        self.max_depth = NYU_MAX_DEPTH
        self._lut = torch.from_numpy(lut)
        self._h5: Any = None
        self._h5_pid: int | None = None

    def _file(self) -> Any:
        # a handle inherited through fork is not safe to share, so every process opens its own
        if self._h5 is None or self._h5_pid != os.getpid():
            self._h5 = _h5py().File(self.root, "r")
            self._h5_pid = os.getpid()
        return self._h5

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"], state["_h5_pid"] = None, None
        return state

    def __getitem__(self, i: int) -> tuple[torch.Tensor, DenseTarget] | tuple[None, None]:
        """``(image uint8 (3, H, W), {"depth": float32 (H, W), "mask": int64 (H, W)})`` at ``load_size``."""
        k = int(self.indices[i])
        try:
            f = self._file()
            image = np.asarray(f["images"][k]).transpose(0, 2, 1)  # (3, W, H) -> (3, H, W)
            depth = np.asarray(f["depths"][k], dtype=np.float32).T
            labels = np.asarray(f["labels"][k]).T.astype(np.int64) if self.has_seg else None
        except OSError as e:
            return self._bad(f"{self.root}[{k}]", f"could not read sample {k} of {self.root}", e)
        image_t = torch.from_numpy(np.ascontiguousarray(image).clip(0, 255).astype(np.uint8))
        depth_t = torch.from_numpy(np.ascontiguousarray(depth))
        depth_t = torch.nan_to_num_(depth_t, nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0.0)
        if labels is None:
            mask_t = torch.full(depth_t.shape, IGNORE_INDEX, dtype=torch.int64)
        else:
            mask_t = self._lut[torch.from_numpy(labels.clip(0, len(self._lut) - 1))]
        image_t, depth_t, mask_t = resize_dense(image_t, depth_t, mask_t, self.load_size)
        return image_t, {"depth": depth_t, "mask": mask_t}

    def __repr__(self) -> str:
        return (
            f"NYUDepthV2Dataset(root={self.root!r}, split={self.split!r}, n={len(self)}, splits={self.split_source!r}, "
            f"load_size={self.load_size}, segmentation={self.has_seg}, classes={self.num_classes})"
        )
