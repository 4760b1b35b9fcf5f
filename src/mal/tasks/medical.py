"""Medical segmentation metrics per 3-D volume: the Dice similarity coefficient (DSC) and the 95th-percentile
Hausdorff distance (HD95) of every foreground class, as the Synapse multi-organ benchmark reports them.

The protocol is the community's (TransUNet's ``test_single_volume`` / ``calculate_metric_percase``, which Swin-Unet,
MISSFormer and MAL-v2 Table 10 reuse): 2-D slice predictions are stacked in slice order into the volume, each
foreground class is scored on the whole volume, and the reported numbers are the means over volumes of each class
(per class) and the mean of those over the classes (``dsc``, ``hd95``; the same as the mean over volumes of the
per-volume means, since every volume scores every class). DSC is in percent; HD95 in mm when the voxel spacing is
known, in voxels otherwise.

Empty cases follow ``calculate_metric_percase`` exactly, so numbers compare with the papers' (on Synapse every test
volume holds all eight organs and only the third case can occur):

=====================  =====================  ================
prediction of class c  ground truth of c      (DSC, HD95)
=====================  =====================  ================
non-empty              non-empty              computed
non-empty              empty                  (1, 0)
empty                  non-empty or empty     (0, 0)
=====================  =====================  ================

HD95 is medpy's ``hd95`` (the 95th percentile of the pooled surface distances of both directions) computed on MONAI's
surfaces and distances (``get_mask_edges``, ``get_surface_distance``); MONAI's own ``compute_hausdorff_distance``
takes the larger of the two directed percentiles instead, which is not what the papers report. DSC is MONAI's
``compute_dice``. Both need MONAI (``pip install "mal-vision[medical]"``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mal.data import IGNORE_INDEX


def _monai_metrics():  # noqa: ANN202 (three functions)
    try:
        from monai.metrics import compute_dice
        from monai.metrics.utils import get_mask_edges, get_surface_distance
    except ImportError:
        raise ImportError('volume metrics (DSC, HD95) need MONAI: pip install "mal-vision[medical]"') from None
    return compute_dice, get_mask_edges, get_surface_distance


def hd95(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """The 95th-percentile symmetric Hausdorff distance (medpy's ``hd95``) between two non-empty boolean masks of
    one shape (``(D, H, W)`` or ``(H, W)``): surface voxels are those the binary erosion removes, distances are
    Euclidean from each surface voxel to the other surface, in units of ``spacing`` (one value per axis; None:
    voxels), and the percentile is over both directions pooled."""
    _, get_mask_edges, get_surface_distance = _monai_metrics()
    pred, target = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if pred.shape != target.shape:
        raise ValueError(f"masks of different shapes: {pred.shape} and {target.shape}")
    if not pred.any() or not target.any():
        raise ValueError("hd95 needs two non-empty masks (see the module's table for empty cases)")
    sp = None if spacing is None else [float(s) for s in spacing]
    if sp is not None and len(sp) != pred.ndim:
        raise ValueError(f"spacing needs one value per axis ({pred.ndim}), got {list(spacing)}")
    edges_pred, edges_target = get_mask_edges(pred, target, crop=True)[:2]
    edges_pred, edges_target = np.asarray(edges_pred, dtype=bool), np.asarray(edges_target, dtype=bool)
    forward = np.asarray(get_surface_distance(edges_pred, edges_target, "euclidean", sp), dtype=np.float64)
    backward = np.asarray(get_surface_distance(edges_target, edges_pred, "euclidean", sp), dtype=np.float64)
    return float(np.percentile(np.concatenate([forward, backward]), 95))


def case_metrics(
    pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, num_classes: int, *,
    spacing: Sequence[float] | None = None, ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """DSC (in [0, 1]) and HD95 of classes ``1 .. num_classes - 1`` of one volume: ``pred`` and ``target`` are class
    ids of one shape, e.g. ``(D, H, W)``; voxels whose target is ``ignore_index`` count as background in both.
    Returns two arrays ``(num_classes - 1,)``; empty cases as in the module's table."""
    compute_dice, _, _ = _monai_metrics()
    pred, target = torch.as_tensor(np.asarray(pred)).long(), torch.as_tensor(np.asarray(target)).long()
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(target.shape)} differ in shape")
    ignored = target == ignore_index
    pred, target = pred.masked_fill(ignored, 0), target.masked_fill(ignored, 0)
    if target.numel() and int(target.max()) >= num_classes:
        raise ValueError(f"ground truth holds class ids >= num_classes ({num_classes})")
    dice = compute_dice(pred[None, None], target[None, None], include_background=False, num_classes=num_classes)[0]
    dsc, hd = np.zeros(num_classes - 1), np.zeros(num_classes - 1)
    for c in range(1, num_classes):
        p, t = pred == c, target == c
        has_p, has_t = bool(p.any()), bool(t.any())
        if has_p and has_t:
            dsc[c - 1], hd[c - 1] = float(dice[c - 1]), hd95(p.numpy(), t.numpy(), spacing)
        elif has_p:  # a class predicted where there is none: TransUNet's (1, 0)
            dsc[c - 1] = 1.0
    return dsc, hd


def metric_key(name: str) -> str:
    """A class name as a metric-key suffix: ``"kidney (L)"`` -> ``"kidney_l"``."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


class VolumeMetrics:
    """DSC / HD95 per volume and foreground class, accumulated over volumes (see the module's docstring).

    ``update(pred, target, spacing)`` scores one volume: class ids ``(D, H, W)`` or logits ``(D, K, H, W)`` against
    ``(D, H, W)`` class ids (``ignore_index`` counts as background). ``update_slices(pred, target, volume, index,
    spacing)`` takes a batch of 2-D slices ``(B, H, W)`` / ``(B, K, H, W)`` tagged with their volume ``(B,)`` and
    slice index ``(B,)`` (and spacing ``(B, 3)``), as an evaluation loop yields them: slices are gathered until the
    volume changes, then stacked by slice index and scored; a volume's slices must come together and without gaps.

    ``compute()`` (scoring any volume still gathering): ``dsc`` (percent) and ``hd95`` (mm or voxels), the means
    over volumes and foreground classes; ``dsc_per_class`` / ``hd95_per_class``, ``{class name: mean over
    volumes}``; ``volumes``, the number scored. ``nan`` when no volume was scored.
    """

    def __init__(
        self, num_classes: int, classes: Sequence[str] | None = None, *, ignore_index: int = IGNORE_INDEX
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"volume metrics need a background and at least one class, got {num_classes} classes")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"{len(classes)} class names for {num_classes} classes")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.names = tuple(classes[1:]) if classes is not None else tuple(f"class{c}" for c in range(1, num_classes))
        self.reset()

    def reset(self) -> None:
        self.cases: list[dict[str, Any]] = []  # per volume: {"volume", "dsc" (K - 1,), "hd95" (K - 1,)}
        self._gathering: int | None = None
        self._slices: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._spacing: tuple[float, ...] | None = None
        self._scored: set[int] = set()

    def _labels(self, pred: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, K, H, W)`` -> ids ``(N, H, W)``; ids as they are."""
        if pred.dim() == 4:
            if pred.shape[1] != self.num_classes:
                raise ValueError(f"logits have {pred.shape[1]} classes, expected {self.num_classes}")
            return pred.argmax(dim=1)
        return pred

    def update(
        self, pred: torch.Tensor, target: torch.Tensor, spacing: Sequence[float] | None = None, *,
        volume: int | None = None,
    ) -> None:  # fmt: skip
        """Score one volume (``volume``: its number in :attr:`cases`; default: the count so far)."""
        pred = self._labels(torch.as_tensor(pred))
        if pred.shape != target.shape or target.dim() != 3:
            raise ValueError(
                f"expected a volume pred (D, H, W) or (D, K, H, W) and target (D, H, W), "
                f"got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        dsc, hd = case_metrics(
            pred.cpu(), target.cpu(), self.num_classes, spacing=spacing, ignore_index=self.ignore_index
        )
        self.cases.append({"volume": len(self.cases) if volume is None else int(volume), "dsc": dsc, "hd95": hd})

    def update_slices(
        self, pred: torch.Tensor, target: torch.Tensor, volume: torch.Tensor, index: torch.Tensor,
        spacing: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """Gather a batch of slices (see the class docstring)."""
        ids = self._labels(pred).cpu()
        if ids.shape != target.shape or target.dim() != 3:
            raise ValueError(f"expected slices (B, H, W), got {tuple(ids.shape)} and {tuple(target.shape)}")
        dtype = np.uint8 if max(self.num_classes, self.ignore_index + 1) <= 256 else np.int32
        ids, labels = ids.numpy().astype(dtype), target.cpu().numpy().astype(dtype)
        for b, (v, k) in enumerate(zip(volume.tolist(), index.tolist(), strict=True)):
            if v != self._gathering:
                self._flush()
                if v in self._scored:
                    raise ValueError(
                        f"slices of volume {v} came after another volume's: evaluate a volume's slices together, in "
                        "dataset order (shuffle=False)"
                    )
                self._gathering = v
                self._spacing = None if spacing is None else tuple(float(s) for s in spacing[b].tolist())
            self._slices.append((int(k), ids[b], labels[b]))

    def _flush(self) -> None:
        """Stack the slices gathered so far into their volume and score it."""
        if self._gathering is None:
            return
        v, slices = self._gathering, sorted(self._slices, key=lambda s: s[0])
        order = [s[0] for s in slices]
        if order != list(range(order[0], order[0] + len(order))):
            raise ValueError(f"volume {v} has slices {order[:8]}...: repeated or missing slices cannot be stacked")
        pred = torch.from_numpy(np.stack([s[1] for s in slices]).astype(np.int64))  # (D, H, W)
        target = torch.from_numpy(np.stack([s[2] for s in slices]).astype(np.int64))
        self._gathering, self._slices = None, []
        self._scored.add(v)
        self.update(pred, target, self._spacing, volume=v)

    def compute(self) -> dict[str, Any]:
        self._flush()
        if not self.cases:
            nan = float("nan")
            return {"dsc": nan, "hd95": nan, "dsc_per_class": dict.fromkeys(self.names, nan),
                    "hd95_per_class": dict.fromkeys(self.names, nan), "volumes": 0}  # fmt: skip
        dsc = 100 * np.mean([c["dsc"] for c in self.cases], axis=0)  # (K - 1,): per class, over volumes
        hd = np.mean([c["hd95"] for c in self.cases], axis=0)
        return {
            "dsc": float(dsc.mean()),
            "hd95": float(hd.mean()),
            "dsc_per_class": dict(zip(self.names, dsc.tolist(), strict=True)),
            "hd95_per_class": dict(zip(self.names, hd.tolist(), strict=True)),
            "volumes": len(self.cases),
        }

    def flat(self) -> dict[str, float]:
        """:meth:`compute` as flat metric keys: ``dsc``, ``hd95``, ``dsc_<class>``, ``hd95_<class>`` (names through
        :func:`metric_key`)."""
        r = self.compute()
        out = {"dsc": r["dsc"], "hd95": r["hd95"]}
        for what in ("dsc", "hd95"):
            out |= {f"{what}_{metric_key(n)}": v for n, v in r[f"{what}_per_class"].items()}
        return out
