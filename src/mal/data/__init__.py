"""Data: one module per dataset (``digits``, ``imagefolder``, ``nyuv2``, ``ade20k``, ``scenes``) and their registry
(:func:`build_dataset`), the ``data`` section of a run config (:class:`DataSettings`, :func:`build_splits`), a collate
that drops unreadable files, batch augmentation."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from mal.config import check_fields
from mal.data.ade20k import ADE20K_CLASSES, ADE20KDataset
from mal.data.collate import BadSampleCounter, collate
from mal.data.common import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_EXTENSIONS,
    BadImageWarning,
    DenseConcat,
    DenseDataset,
    random_subset,
    stratified_subset,
)
from mal.data.digits import DigitsDataset, digits_split_indices
from mal.data.imagefolder import ImageFolderDataset, load_image
from mal.data.mixture import MixturePart, TaskView, build_mixture
from mal.data.nyuv2 import NYUDepthV2Dataset
from mal.data.scenes import SCENE_CLASSES, ProceduralScenesDataset, Scene, render_scene
from mal.data.transforms import BatchAugment, JointAugment, denormalize

__all__ = [
    "ADE20K_CLASSES",
    "DATASETS",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "SCENE_CLASSES",
    "ADE20KDataset",
    "BadImageWarning",
    "BadSampleCounter",
    "BatchAugment",
    "DataSettings",
    "DenseConcat",
    "DenseDataset",
    "DigitsDataset",
    "ImageFolderDataset",
    "MixturePart",
    "JointAugment",
    "NYUDepthV2Dataset",
    "ProceduralScenesDataset",
    "Scene",
    "TaskView",
    "build_dataset",
    "build_splits",
    "collate",
    "denormalize",
    "digits_split_indices",
    "heldout_split",
    "load_image",
    "random_subset",
    "render_scene",
    "stratified_subset",
]

DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": DigitsDataset,
    "imagefolder": ImageFolderDataset,
    "nyuv2": NYUDepthV2Dataset,
    "ade20k": ADE20KDataset,
    "scenes": ProceduralScenesDataset,
}
_ROOT_HELP = {
    "imagefolder": "the folder holding <split>/<class>/<image>",
    "nyuv2": "the path of nyu_depth_v2_labeled.mat",
    "ade20k": "the ADEChallengeData2016 folder",
}


def heldout_split(name: str) -> str:
    """The split that results are reported on: ``test`` for the embedded datasets that have one (digits, scenes),
    ``val`` for the others (ImageNet-style folders, NYUv2, ADE20K)."""
    return "test" if name in ("digits", "scenes") else "val"


def build_dataset(
    name: str, split: str | None, *, root: str | os.PathLike | None = None, load_size: int | None = None, **kwargs: Any
) -> Dataset:
    """Build a registered dataset: ``digits`` and ``scenes`` (``root`` is ignored), ``imagefolder``, ``nyuv2`` and
    ``ade20k`` (need ``root``).

    ``load_size=None`` uses the dataset's default; ``kwargs`` go to the dataset class. ``label_fraction``/``seed``
    choose a labelled subset for every dataset (``scenes`` takes its generator's seed as ``scene_seed``).
    """
    if name == "mixture":
        raise ValueError("a mixture of datasets is built from data.mixture (build_splits), not by name")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(sorted(DATASETS))}, mixture")
    if load_size is not None:
        kwargs["load_size"] = load_size
    if name in _ROOT_HELP:
        if root is None:
            raise ValueError(f"dataset {name!r} needs data.root ({_ROOT_HELP[name]})")
        return DATASETS[name](root, split, **kwargs)
    return DATASETS[name](split, **kwargs)


@dataclass
class DataSettings:
    """Dataset (``mal.data.DATASETS``) and batch augmentation."""

    name: str = "digits"
    root: str | None = None  # imagefolder: the folder holding <split>/<class>/<image>
    train_split: str = "train"
    val_split: str | None = "val"  # None: no validation
    image_size: int = 32  # model input (also the position-embedding grid of a new model)
    load_size: int | tuple[int, int] | None = None  # decoded size (square or (H, W)) before augmentation; None: default
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: bool = True
    label_fraction: float = 1.0  # keep a stratified fraction of the training labels
    # keyword arguments of the dataset class, e.g. nyuv2: {segmentation: true, class_map: /data/nyu40.json}
    options: dict[str, Any] = field(default_factory=dict)
    mixture: list[MixturePart] | None = None  # name: mixture: dense datasets with their tasks and weights
    num_workers: int = 0
    max_bad_fraction: float = 0.01  # unreadable images allowed before the run stops

    def validate(self) -> None:
        lo, hi = self.crop_scale
        r_lo, r_hi = self.crop_ratio
        load = (self.load_size,) * 2 if isinstance(self.load_size, int) else self.load_size or (1, 1)
        check_fields(
            self,
            image_size=(self.image_size >= 1, ">= 1"),
            load_size=(min(load) >= 1, ">= 1 (or null: the dataset's default)"),
            crop_scale=(0 < lo <= hi <= 1, "0 < lo <= hi <= 1"),
            crop_ratio=(0 < r_lo <= r_hi, "0 < lo <= hi"),
            label_fraction=(0 < self.label_fraction <= 1, "in (0, 1]"),
            num_workers=(self.num_workers >= 0, ">= 0"),
            max_bad_fraction=(0 <= self.max_bad_fraction <= 1, "in [0, 1]"),
            mixture=((self.name == "mixture") == bool(self.mixture), "a list of parts exactly when name is 'mixture'"),
            options=(not (self.mixture and self.options), "empty for a mixture (each part has its own options)"),
        )


def build_splits(data: DataSettings, **train_kwargs: Any) -> tuple[Dataset, Dataset | None]:
    """The training and (when ``data.val_split`` is set) validation datasets of ``data``; ``train_kwargs`` go to the
    training split only (e.g. ``label_fraction``)."""
    if data.name == "mixture":
        kw = {"build": build_dataset, "load_size": data.load_size}
        train = build_mixture(data.mixture, data.train_split, **kw, **train_kwargs)
        val = build_mixture(data.mixture, data.val_split, **kw, train=False) if data.val_split else None
        return train, val
    kw = {"root": data.root, "load_size": data.load_size, **data.options}
    train = build_dataset(data.name, data.train_split, **kw, **train_kwargs)
    val = build_dataset(data.name, data.val_split, **kw) if data.val_split else None
    return train, val
