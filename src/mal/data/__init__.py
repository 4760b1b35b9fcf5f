"""Data: datasets of uint8 ``(C, S, S)`` images, a collate that drops unreadable files, batch augmentation."""

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
    load_image,
    stratified_subset,
)
from mal.data.transforms import BatchAugment, denormalize

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "BadImageWarning",
    "BadSampleCounter",
    "BatchAugment",
    "DigitsDataset",
    "ImageFolderDataset",
    "build_dataset",
    "collate",
    "denormalize",
    "digits_split_indices",
    "load_image",
    "stratified_subset",
]
