"""Data: datasets of uint8 ``(C, S, S)`` images (and dense ones with depth and masks), a collate that drops
unreadable files, batch augmentation."""

from mal.data.collate import BadSampleCounter, collate
from mal.data.datasets import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_EXTENSIONS,
    BadImageWarning,
    DigitsDataset,
    ImageFolderDataset,
    build_dataset,
    digits_split_indices,
    heldout_split,
    load_image,
    stratified_subset,
)
from mal.data.dense import (
    ADE20K_CLASSES,
    IGNORE_INDEX,
    SCENE_CLASSES,
    ADE20KDataset,
    DenseConcat,
    DenseDataset,
    NYUDepthV2Dataset,
    ProceduralScenesDataset,
    Scene,
    random_subset,
    render_scene,
)
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
    "DenseConcat",
    "DenseDataset",
    "DigitsDataset",
    "ImageFolderDataset",
    "JointAugment",
    "NYUDepthV2Dataset",
    "ProceduralScenesDataset",
    "Scene",
    "build_dataset",
    "collate",
    "denormalize",
    "digits_split_indices",
    "heldout_split",
    "load_image",
    "random_subset",
    "render_scene",
    "stratified_subset",
]
