"""Data: one module per dataset (``digits``, ``imagefolder``, ``nyuv2``, ``ade20k``, ``scenes``; detection: ``coco``,
``instances``; medical, 2-D slices of 3-D volumes: ``synapse``, ``volumes``) and their registry
(:func:`build_dataset`), the ``data`` section of a run config (:class:`DataSettings`, :func:`build_splits`), a
collate that drops unreadable files, per-sample and batch augmentation."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from mal.config import FieldError, check_fields
from mal.data.ade20k import ADE20K_CLASSES, ADE20KDataset
from mal.data.coco import AnnotationWarning, CocoDetection, DetectionDataset, encode_rle, write_coco
from mal.data.collate import BadSampleCounter, collate
from mal.data.common import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_EXTENSIONS,
    VOLUME_TAGS,
    BadImageWarning,
    DenseConcat,
    DenseDataset,
    SliceDataset,
    UnsupportedImageError,
    ValueRangeWarning,
    Volume,
    decode_image,
    random_subset,
    read_image,
    stratified_subset,
)
from mal.data.digits import DigitsDataset, digits_split_indices
from mal.data.imagefolder import ImageFolderDataset, load_image
from mal.data.instances import INSTANCE_CLASSES, MIN_VISIBLE_PIXELS, ProceduralInstancesDataset, scene_instances
from mal.data.mixture import MixturePart, TaskView, build_mixture
from mal.data.nyuv2 import NYUDepthV2Dataset
from mal.data.scenes import SCENE_CLASSES, ProceduralScenesDataset, Scene, render_scene
from mal.data.synapse import SYNAPSE_CLASSES, SynapseDataset
from mal.data.transforms import (
    BatchAugment,
    JointAugment,
    RandAugment,
    RandAugmentSpec,
    RandomErasing,
    SampleAugment,
    denormalize,
    random_resized_crop_box,
    resize_center_crop,
)
from mal.data.volumes import VOLUME_CLASSES, ProceduralVolumesDataset, render_volume

__all__ = [
    "ADE20K_CLASSES",
    "DATASETS",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "INSTANCE_CLASSES",
    "MIN_VISIBLE_PIXELS",
    "SCENE_CLASSES",
    "SYNAPSE_CLASSES",
    "VOLUME_CLASSES",
    "VOLUME_TAGS",
    "ADE20KDataset",
    "AnnotationWarning",
    "BadImageWarning",
    "BadSampleCounter",
    "BatchAugment",
    "CocoDetection",
    "DataSettings",
    "DenseConcat",
    "DenseDataset",
    "DetectionDataset",
    "DigitsDataset",
    "ImageFolderDataset",
    "MixturePart",
    "JointAugment",
    "NYUDepthV2Dataset",
    "ProceduralInstancesDataset",
    "ProceduralScenesDataset",
    "ProceduralVolumesDataset",
    "RandAugment",
    "RandAugmentSpec",
    "RandomErasing",
    "SAMPLE_AUGMENTED",
    "SampleAugment",
    "Scene",
    "SliceDataset",
    "SynapseDataset",
    "TaskView",
    "UnsupportedImageError",
    "ValueRangeWarning",
    "Volume",
    "build_dataset",
    "build_splits",
    "collate",
    "decode_image",
    "denormalize",
    "digits_split_indices",
    "encode_rle",
    "heldout_split",
    "load_image",
    "loader_workers",
    "random_resized_crop_box",
    "random_subset",
    "read_image",
    "render_scene",
    "render_volume",
    "resize_center_crop",
    "scene_instances",
    "stratified_subset",
    "write_coco",
]

DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": DigitsDataset,
    "imagefolder": ImageFolderDataset,
    "nyuv2": NYUDepthV2Dataset,
    "ade20k": ADE20KDataset,
    "scenes": ProceduralScenesDataset,
    "coco": CocoDetection,
    "instances": ProceduralInstancesDataset,
    "synapse": SynapseDataset,
    "volumes": ProceduralVolumesDataset,
}
#: Datasets that decode image files of any size: their training split is cropped from the full image per sample in
#: the data-loader workers (:class:`SampleAugment`, with RandAugment when ``data.randaugment`` is set), and
#: ``data.num_workers: null`` gives them worker processes. The others are held in memory or rendered at one size:
#: their crops happen on the batch.
SAMPLE_AUGMENTED = ("imagefolder",)
_ROOT_HELP = {
    "imagefolder": "the folder holding <split>/<class>/<image>",
    "nyuv2": "the path of nyu_depth_v2_labeled.mat",
    "ade20k": "the ADEChallengeData2016 folder",
    "coco": "the COCO folder holding annotations/instances_<split>2017.json and <split>2017/",
    "synapse": "the folder holding train_npz/, test_vol_h5/ and lists/lists_Synapse/ (TransUNet's release)",
}


#: Dataset arguments that other ``data`` keys set (``root``, ``load_size``, ...) or the engine passes.
_SET_ELSEWHERE = ("self", "root", "split", "load_size", "label_fraction", "seed", "transform")


def dataset_options(name: str) -> list[str]:
    """The keyword arguments of dataset ``name`` that ``data.options`` may set."""
    if name not in DATASETS:
        return []
    params = inspect.signature(DATASETS[name]).parameters.values()
    return [p.name for p in params if p.name not in _SET_ELSEWHERE and p.kind is p.POSITIONAL_OR_KEYWORD]


def unknown_options(name: str, options: dict[str, Any]) -> list[str]:
    """The keys of ``options`` that dataset ``name`` does not take (none for an unknown dataset: the registry
    reports that one)."""
    if name not in DATASETS:
        return []
    valid = dataset_options(name)
    return sorted(k for k in options if k not in valid)


def heldout_split(name: str) -> str:
    """The split that results are reported on: ``test`` for the generated datasets that have one (digits, scenes,
    instances, volumes) and for Synapse (its 12 test volumes, no validation split), ``val`` for the others
    (ImageNet-style folders, NYUv2, ADE20K, COCO)."""
    return "test" if name in ("digits", "scenes", "instances", "volumes", "synapse") else "val"


def build_dataset(
    name: str, split: str | None, *, root: str | os.PathLike | None = None, load_size: int | None = None, **kwargs: Any
) -> Dataset:
    """Build a registered dataset: ``digits``, ``scenes``, ``instances`` and ``volumes`` (``root`` is ignored),
    ``imagefolder``, ``nyuv2``, ``ade20k``, ``coco`` and ``synapse`` (need ``root``).

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
    """Dataset (``mal.data.DATASETS``) and augmentation. Training: RandomResizedCrop (``crop_scale``, ``crop_ratio``;
    per sample from the full image in the loader for ``SAMPLE_AUGMENTED`` datasets, on the batch for the others),
    RandAugment (loader), horizontal flip, normalization, random erasing (batch). Evaluation: resize (and centre
    crop with ``eval_crop``), normalization."""

    name: str = "digits"
    root: str | None = None  # imagefolder: the folder holding <split>/<class>/<image>
    train_split: str = "train"
    val_split: str | None = "val"  # None: no validation
    image_size: int = 32  # model input (also the position-embedding grid of a new model)
    # decoded size (square or (H, W)) before augmentation; None: the dataset's default. imagefolder: the evaluation
    # images' (shorter side to load_size, centre square); its training crops come from the full image
    load_size: int | tuple[int, int] | None = None
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip: bool = True
    # RandAugment in timm's notation, e.g. "rand-m9-mstd0.5" (MAE / DeiT fine-tuning): 2 operations per image, each
    # with p=0.5 at magnitude 9 of 10 + N(0, 0.5) noise; applied per image in the loader workers, so imagefolder only
    randaugment: str | None = None
    erase_prob: float = 0.0  # random erasing per image after normalization, N(0, 1) pixels (timm's mode "pixel")
    # dense tasks: kornia's ColorJitter (brightness, contrast, saturation, hue) on the training images, after the
    # joint crop and flip (ViL's ADE20K recipe: [0.5, 0.5, 0.5, 0.25]); None: off
    color_jitter: tuple[float, float, float, float] | None = None
    # evaluation: resize the shorter side to floor(image_size / eval_crop), centre-crop image_size (0.875 at 224 px:
    # 256 -> 224, set load_size: 256 so the resize happens once, at decode); None: resize to image_size
    eval_crop: float | None = None
    # keep a (stratified where there are classes) fraction of the training labels, chosen by the run's seed; in
    # pretraining the share of the training images used, the same subset as a fine-tune with this fraction and seed
    label_fraction: float = 1.0
    # keyword arguments of the dataset class, e.g. nyuv2: {segmentation: true, class_map: /data/nyu40.json};
    # imagefolder: {channels: 1, value_range: [-1000, 400]} (single-channel data, raw values mapped to [0, 1])
    options: dict[str, Any] = field(default_factory=dict)
    mixture: list[MixturePart] | None = None  # name: mixture: dense datasets with their tasks and weights
    # data-loader processes (persistent) per training process; None: for SAMPLE_AUGMENTED datasets the CPUs per
    # training process less one (for it), 1 to 16; 0 for in-memory datasets (digits, scenes: workers only add
    # copying). What one worker decodes and augments per second: docs/BENCHMARKS.md, "Data loading". Changes speed,
    # not results
    num_workers: int | None = None
    max_bad_fraction: float = 0.01  # unreadable images allowed before the run stops

    def validate(self) -> None:
        parts = [(f"mixture.{i}.options", m.name, m.options) for i, m in enumerate(self.mixture or [])]
        for where, name, options in [("options", self.name, self.options), *parts]:
            unknown = unknown_options(name, options)
            if unknown:
                raise FieldError(where, f"has unknown option(s) {', '.join(unknown)} for dataset {name!r} (valid: "
                                 f"{', '.join(dataset_options(name)) or 'none'})")  # fmt: skip
        lo, hi = self.crop_scale
        r_lo, r_hi = self.crop_ratio
        load = (self.load_size,) * 2 if isinstance(self.load_size, int) else self.load_size or (1, 1)
        if self.randaugment is not None:
            try:
                RandAugmentSpec.parse(self.randaugment)
            except ValueError as e:
                raise FieldError("randaugment", str(e).removeprefix("randaugment ")) from None
        check_fields(
            self,
            image_size=(self.image_size >= 1, ">= 1"),
            load_size=(min(load) >= 1, ">= 1 (or null: the dataset's default)"),
            crop_scale=(0 < lo <= hi <= 1, "0 < lo <= hi <= 1"),
            crop_ratio=(0 < r_lo <= r_hi, "0 < lo <= hi"),
            randaugment=(
                self.randaugment is None or self.name in SAMPLE_AUGMENTED,
                f"null for dataset {self.name!r} (RandAugment runs per sample in the loader: "
                f"{', '.join(SAMPLE_AUGMENTED)})",
            ),
            erase_prob=(0 <= self.erase_prob <= 1, "in [0, 1]"),
            color_jitter=(
                self.color_jitter is None or (min(self.color_jitter) >= 0 and self.color_jitter[3] <= 0.5),
                "four values >= 0 (brightness, contrast, saturation, hue <= 0.5) or null",
            ),
            eval_crop=(self.eval_crop is None or 0 < self.eval_crop <= 1, "in (0, 1] (or null: resize only)"),
            label_fraction=(0 < self.label_fraction <= 1, "in (0, 1]"),
            num_workers=(self.num_workers is None or self.num_workers >= 0, ">= 0 (or null: automatic)"),
            max_bad_fraction=(0 <= self.max_bad_fraction <= 1, "in [0, 1]"),
            mixture=((self.name == "mixture") == bool(self.mixture), "a list of parts exactly when name is 'mixture'"),
            options=(not (self.mixture and self.options), "empty for a mixture (each part has its own options)"),
        )

    @property
    def sample_augmented(self) -> bool:
        """Whether training crops (and RandAugment) happen per sample in the loader rather than on the batch."""
        return self.name in SAMPLE_AUGMENTED

    def sample_transform(self) -> SampleAugment | None:
        """The training split's per-sample transform (:class:`SampleAugment`), or None when crops happen on the
        batch."""
        if not self.sample_augmented:
            return None
        return SampleAugment(
            self.image_size, scale=self.crop_scale, ratio=self.crop_ratio, randaugment=self.randaugment
        )


def loader_workers(data: DataSettings, processes_per_node: int = 1) -> int:
    """``data.num_workers``, or when it is None: for datasets that decode files (:data:`SAMPLE_AUGMENTED`) the CPUs
    of this training process (``CPUs // processes_per_node``) less one for the process itself, at least 1 and at
    most 16 (about what a GPU training ViL-T at 2000 img/s needs); 0 for the others."""
    if data.num_workers is not None:
        return data.num_workers
    if not data.sample_augmented:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cpus // max(1, processes_per_node) - 1))


def build_splits(data: DataSettings, **train_kwargs: Any) -> tuple[Dataset, Dataset | None]:
    """The training and (when ``data.val_split`` is set) validation datasets of ``data``; ``train_kwargs`` go to the
    training split only (e.g. ``label_fraction``). The training split of a :data:`SAMPLE_AUGMENTED` dataset gets its
    per-sample transform (:meth:`DataSettings.sample_transform`)."""
    if data.name == "mixture":
        kw = {"build": build_dataset, "load_size": data.load_size}
        train = build_mixture(data.mixture, data.train_split, **kw, **train_kwargs)
        val = build_mixture(data.mixture, data.val_split, **kw, train=False) if data.val_split else None
        return train, val
    transform = data.sample_transform()
    if transform is not None:
        train_kwargs["transform"] = transform
    kw = {"root": data.root, "load_size": data.load_size, **data.options}
    train = build_dataset(data.name, data.train_split, **kw, **train_kwargs)
    val = build_dataset(data.name, data.val_split, **kw) if data.val_split else None
    return train, val
