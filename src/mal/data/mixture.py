"""A mixture of dense datasets for multi-task pretraining (MAL-v1 stage 2: NYU Depth v2 for depth together with ADE20K
for segmentation): each part contributes only the labels of its own tasks, at its own sampling weight.

    data:
      name: mixture
      load_size: [240, 320]
      mixture:
        - {name: nyuv2, root: /data/nyu_depth_v2_labeled.mat, tasks: [depth]}
        - {name: ade20k, root: /data/ADEChallengeData2016, tasks: [segmentation], weight: 0.25}

A sample keeps the labels of its part's ``tasks`` and has the others blanked (depth 0, mask ignore), which the
dense losses read as "no label": it adds to its own task's loss only. ``weight`` is how many times a part's samples
appear per epoch: 1 once each; 2 twice (a small dataset beside a large one); 0.25 a fixed quarter of them, drawn
once with the mixture's seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from mal.data.common import IGNORE_INDEX, DenseConcat, DenseTarget

TASKS = ("depth", "segmentation")


@dataclass
class MixturePart:
    """One dataset of a mixture: a registered dense dataset (``name``, ``root``), the tasks whose labels it gives,
    its sampling ``weight`` (see the module docstring) and extra keyword arguments of the dataset (``options``)."""

    name: str = "scenes"
    root: str | None = None
    tasks: tuple[Literal["depth", "segmentation"], ...] = ("depth", "segmentation")
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError(f"mixture part {self.name!r} gives no task: set tasks to depth and/or segmentation")
        if not self.weight > 0:
            raise ValueError(f"mixture part {self.name!r}: weight must be > 0, got {self.weight}")


class TaskView(Dataset):
    """A dense dataset that gives only the labels of ``tasks``: depth is 0 and the mask :data:`IGNORE_INDEX` for
    the others. ``indices`` (optional) picks and repeats samples of the dataset (the sampling weight)."""

    def __init__(self, dataset: Dataset, tasks: tuple[str, ...], indices: np.ndarray | None = None) -> None:
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; valid: {', '.join(TASKS)}")
        if "depth" in tasks and not dataset.has_depth:
            raise ValueError(f"{dataset!r} has no depth labels for the task 'depth'")
        if "segmentation" in tasks and not dataset.has_seg:
            raise ValueError(f"{dataset!r} has no segmentation labels for the task 'segmentation'")
        self.dataset, self.tasks = dataset, tuple(tasks)
        self.indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
        for attr in ("classes", "num_classes", "channels", "load_size", "mean", "std", "max_depth"):
            setattr(self, attr, getattr(dataset, attr))
        self.has_depth = "depth" in tasks
        self.has_seg = "segmentation" in tasks

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, DenseTarget | None]:
        image, target = self.dataset[int(self.indices[i])]
        if image is None:  # unreadable: the collate drops it
            return image, target
        if not self.has_depth:
            target = {**target, "depth": torch.zeros_like(target["depth"])}
        if not self.has_seg:
            target = {**target, "mask": torch.full_like(target["mask"], IGNORE_INDEX)}
        return image, target

    def __repr__(self) -> str:
        return f"TaskView({self.dataset!r}, tasks={list(self.tasks)}, n={len(self)})"


def weighted_indices(n: int, weight: float, seed: int = 0) -> np.ndarray:
    """The sample positions of a part of ``n`` samples at sampling ``weight``: every sample ``floor(weight)`` times,
    plus a seeded random ``weight - floor(weight)`` share of them once more (at least one sample in all)."""
    whole = int(np.floor(weight))
    extra = max(0, round((weight - whole) * n))
    picked = np.sort(np.random.default_rng(seed).permutation(n)[:extra])
    out = np.concatenate([np.tile(np.arange(n), whole), picked])
    return out if len(out) else np.arange(min(n, 1))


def build_mixture(
    parts: list[MixturePart], split: str, *, build: Any, load_size: Any = None, seed: int = 0, train: bool = True,
    **kwargs: Any,
) -> DenseConcat:  # fmt: skip
    """The mixture of ``parts`` on ``split``: every part built with ``build(name, split, root=, load_size=, seed=,
    **options, **kwargs)`` (the dataset registry), wrapped in a :class:`TaskView`, and concatenated; sampling weights
    apply to the training split only (``train``)."""
    views = []
    for i, part in enumerate(parts):
        try:
            dataset = build(part.name, split, root=part.root, load_size=load_size, seed=seed, **part.options, **kwargs)
        except ValueError as e:  # name the part: the registry's message speaks of data.root
            message = str(e).replace("data.root", f"data.mixture.{i}.root")
            raise ValueError(f"data.mixture.{i} ({part.name}): {message}") from None
        indices = weighted_indices(len(dataset), part.weight, seed + i) if train else None
        views.append(TaskView(dataset, part.tasks, indices))
    return DenseConcat(views)
