"""Synapse multi-organ CT (MICCAI 2015 Multi-Atlas Abdomen Labeling) in TransUNet's preprocessed release: 8 abdominal
organs, 18 training cases as 2-D slices, 12 test cases as 3-D volumes (the split of TransUNet, Swin-Unet and MAL-v2
Table 10)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mal.data.common import (
    IMAGENET_MEAN,
    IMAGENET_MEAN_GRAY,
    IMAGENET_STD,
    IMAGENET_STD_GRAY,
    DenseTarget,
    SliceDataset,
    Volume,
    as_hw,
    random_subset,
)

#: Label ids 1..8 of TransUNet's release (not the raw data's 13-organ ids: its preprocessing renumbered them; checked
#: voxel by voxel against the raw labels by the community), in the order of the papers' tables.
SYNAPSE_CLASSES = (
    "background", "aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach",
)  # fmt: skip
#: split -> (folder, list file under lists/lists_Synapse, file suffix)
SYNAPSE_SPLITS = {"train": ("train_npz", "train.txt", ".npz"), "test": ("test_vol_h5", "test_vol.txt", ".npy.h5")}
SYNAPSE_SIZE = 512  # the slices' native size
# what a corrupt file raises: numpy's zip reader, h5py's OSError, short reads
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


def _h5py():  # noqa: ANN202
    try:
        import h5py
    except ImportError:
        raise ImportError('reading Synapse test volumes needs h5py: pip install "mal-vision[dense]"') from None
    return h5py


def synapse_names(root: Path, split: str) -> list[str]:
    """The sample names of a split (no extension): ``lists/lists_Synapse/<train|test_vol>.txt`` under ``root`` when
    present, else every file of the split's folder, sorted."""
    folder, list_name, suffix = SYNAPSE_SPLITS[split]
    listing = root / "lists" / "lists_Synapse" / list_name
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not names:
            raise ValueError(f"Synapse list {listing} is empty")
        return names
    names = sorted(p.name.removesuffix(suffix) for p in (root / folder).iterdir() if p.name.endswith(suffix))
    if not names:
        raise FileNotFoundError(f"no {suffix} files in {root / folder} (and no list {listing})")
    return names


def _file_spacing(f: Any) -> tuple[float, float, float] | None:
    """A volume file's own ``spacing`` (z, y, x in mm: an attribute or a dataset of 3 numbers), if it has one."""
    raw = f.attrs.get("spacing") if "spacing" in f.attrs else (f["spacing"][()] if "spacing" in f else None)
    if raw is None:
        return None
    values = np.asarray(raw, dtype=np.float64).ravel()
    if values.shape != (3,) or not (values > 0).all():
        raise ValueError(f"{f.filename}: spacing must be 3 positive numbers (z, y, x in mm), got {values.tolist()}")
    return tuple(values.tolist())


class SynapseDataset(SliceDataset):
    """Synapse multi-organ CT as TransUNet released it: ``root`` holds ``train_npz/<case>_slice<k>.npz`` (arrays
    ``image``, float in [0, 1]: HU clipped to [-125, 275] and scaled, and ``label``, ids 0..8, ``(512, 512)``) and
    ``test_vol_h5/<case>.npy.h5`` (datasets ``image`` and ``label``, ``(D, 512, 512)``), with the case lists
    ``lists/lists_Synapse/train.txt`` and ``test_vol.txt`` (names without extension; without them, every file of
    the folder). Classes: :data:`SYNAPSE_CLASSES`.

    Splits: ``train``, the training slices (2211 of 18 cases); ``test``, the slices of the 12 test volumes in order,
    one sample per slice, with ``volumes`` (:class:`~mal.data.common.Volume` per case) and volume tags in every
    target for the per-volume DSC / HD95. Samples are ``(image float32 (C, H, W), {"depth": zeros, "mask": int64
    (H, W)})`` resized to ``load_size`` (image bilinear, mask nearest); ``channels=3`` replicates the slice for an
    encoder pretrained on RGB. Normalization: ImageNet's statistics (their mean over channels for one channel).

    ``spacing`` (z, y, x in mm) is the test volumes' voxel spacing, for HD95 in mm; a volume file's own ``spacing``
    (attribute or dataset) takes precedence. TransUNet's release has none, and the papers' HD95 are in voxels of the
    512 x 512 slices (unit spacing): the default. In-plane spacing is rescaled when ``load_size`` is not 512, so HD95
    keeps its units. ``label_fraction < 1`` keeps a seeded random fraction of the slices (the volumes are then
    incomplete: no ``volumes``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        load_size: int | tuple[int, int] | None = SYNAPSE_SIZE,
        channels: int = 1,
        spacing: tuple[float, float, float] | list[float] | None = None,
        label_fraction: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ):
        if split not in SYNAPSE_SPLITS:
            raise ValueError(f"unknown Synapse split {split!r}; valid splits: {', '.join(SYNAPSE_SPLITS)}")
        root = Path(root)
        folder = root / SYNAPSE_SPLITS[split][0]
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Synapse folder not found: {folder} (data.root is the folder holding train_npz/ and test_vol_h5/)"
            )
        if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
            raise ValueError(f"spacing must be 3 positive numbers (z, y, x in mm), got {list(spacing)}")
        self.root, self.split = str(root), split
        self.load_size = as_hw(SYNAPSE_SIZE if load_size is None else load_size)
        self.channels = self._check_channels(channels)
        self.classes, self.num_classes = SYNAPSE_CLASSES, len(SYNAPSE_CLASSES)
        self.mean, self.std = (IMAGENET_MEAN, IMAGENET_STD) if self.channels == 3 else (IMAGENET_MEAN_GRAY,
                                                                                        IMAGENET_STD_GRAY)  # fmt: skip
        self.label_fraction = float(label_fraction)
        suffix = SYNAPSE_SPLITS[split][2]
        names = synapse_names(root, split)
        files = [folder / f"{n}{suffix}" for n in names]
        missing = [f for f in files if not f.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more of {len(files)})" if len(missing) > 1 else ""
            raise FileNotFoundError(f"Synapse file not found: {missing[0]}{more}")
        if split == "train":
            samples = [(str(f), None) for f in files]
            volumes: list[Volume] = []
        else:
            samples, volumes = self._scan_volumes(files, spacing)
        self.indices = random_subset(len(samples), label_fraction, seed)
        self.samples = [samples[i] for i in self.indices]
        self._set_volumes(volumes if self.label_fraction == 1.0 else [])
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()
        self._warned: set[str] = set()

    def _scan_volumes(
        self, files: list[Path], spacing: Any
    ) -> tuple[list[tuple[str, int]], list[Volume]]:  # fmt: skip
        """One sample per slice of every volume file, and the volumes (their shapes read from the files)."""
        h5py = _h5py()
        samples: list[tuple[str, int]] = []
        volumes = []
        for f in files:
            try:
                with h5py.File(f, "r") as h:
                    if "image" not in h or "label" not in h:
                        raise ValueError(f"Synapse volume {f} needs datasets 'image' and 'label', has {sorted(h)}")
                    shape, label_shape = h["image"].shape, h["label"].shape
                    own = _file_spacing(h)
            except OSError as e:
                raise OSError(f"cannot read Synapse volume {f}: {e}") from None
            if len(shape) != 3 or shape != label_shape:
                raise ValueError(f"Synapse volume {f}: image {shape} and label {label_shape} must be one (D, H, W)")
            z, y, x = own or (tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0))
            (h_out, w_out), (h_in, w_in) = self.load_size, shape[1:]
            name = f.name.removesuffix(SYNAPSE_SPLITS["test"][2])
            start = len(samples)
            volumes.append(Volume(name, start, start + shape[0], (z, y * (h_in / h_out), x * (w_in / w_out))))
            samples += [(str(f), k) for k in range(shape[0])]
        return samples, volumes

    def _volume_file(self, path: str) -> Any:
        """The open HDF5 file at ``path``, opened once per process (DataLoader workers each open their own)."""
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if path not in self._handles:
            self._handles[path] = _h5py().File(path, "r")
        return self._handles[path]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, DenseTarget] | tuple[None, None]:
        """``(image float32 (C, H, W), {"depth": zeros float32 (H, W), "mask": int64 (H, W)})`` (+ the volume tags
        in the test split), or ``(None, None)`` when a file cannot be read."""
        path, k = self.samples[i]
        try:
            if k is None:
                with np.load(path) as data:
                    if "image" not in data or "label" not in data:
                        raise KeyError(f"Synapse slice {path} needs arrays 'image' and 'label', has {data.files}")
                    image, label = data["image"], data["label"]
            else:
                f = self._volume_file(path)
                image, label = f["image"][k], f["label"][k]
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        except _READ_ERRORS as e:
            return self._bad(path, f"could not read Synapse {'slice' if k is None else 'volume'} {path}", e)
        if image.shape != label.shape or image.ndim != 2:
            raise ValueError(f"{path}: image {image.shape} and label {label.shape} must be one 2-D slice shape")
        label = np.asarray(label)
        if label.size and (label.min() < 0 or label.max() >= self.num_classes or (label != np.round(label)).any()):
            raise ValueError(
                f"{path}: labels must be ids 0..{self.num_classes - 1} (TransUNet's 8 organs), got values in "
                f"[{label.min()}, {label.max()}]"
            )
        image_t = torch.from_numpy(np.asarray(image, dtype=np.float32))
        return self._slice_sample(i, image_t, torch.from_numpy(label.astype(np.int64)))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open HDF5 files do not pickle (spawned loader workers)

    def __repr__(self) -> str:
        what = f"{len(self.volumes)} volumes" if self.volumes else "slices"
        return (
            f"SynapseDataset(root={self.root!r}, split={self.split!r}, n={len(self)} ({what}), "
            f"load_size={self.load_size}, channels={self.channels})"
        )
