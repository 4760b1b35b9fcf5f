"""Predictions on image files (``mal predict``): the images a command line names, each read and preprocessed as the
model's own evaluation did, and the outputs of a classifier (top-k classes with their names and probabilities), a
segmentation model (class ids) or a depth model (metres), with the files they are saved as.

Preprocessing comes from the model's ``pretrained_cfg`` (saved with its weights): a classifier's image is decoded by
:func:`~mal.data.load_image` (the reader of :func:`~mal.data.read_image`, the shorter side resized bicubic to
``floor(S / crop_pct)`` and the centre square kept, as an ImageFolder's evaluation images are) and goes through the
evaluation :class:`~mal.data.BatchAugment` (centre ``S x S`` crop, normalization with the recorded mean / std); a
dense model's whole image is resized to its input size by the evaluation :class:`~mal.data.JointAugment`, and its
output is resized back to the image's own size, as a dense run's evaluation does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mal.data import IMG_EXTENSIONS, BatchAugment, JointAugment, load_image, read_image
from mal.data.common import _DECODE_ERRORS
from mal.io import atomic_write
from mal.models.base import EncoderClassifier
from mal.tasks.dense import DenseEvaluator, DensePredictor
from mal.tasks.dense import predict as dense_predict

#: What a file that cannot be predicted raises while it is read (corrupt, truncated, not an image, a pixel format the
#: reader does not represent): reported, and the other files predicted.
READ_ERRORS = _DECODE_ERRORS
#: Depth PNGs hold ``round(metres * DEPTH_PNG_SCALE)`` as 16-bit integers (millimetres, as NYUv2's and TUM's PNGs),
#: so 1 mm steps up to 65.535 m; 0 means no depth.
DEPTH_PNG_SCALE = 1000.0
TASKS = ("classification", "segmentation", "depth")


def find_images(inputs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """``(file, name)`` of every image the command line names, in order: a file as given (``name`` its file name);
    a folder walked recursively for files with an :data:`~mal.data.IMG_EXTENSIONS` extension (any case; hidden
    files and folders skipped), sorted, ``name`` the path under the folder. A file named twice counts once. Raises
    ``FileNotFoundError`` for a path that does not exist, ``ValueError`` when there is no image at all."""
    found: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for given in map(Path, inputs):
        if given.is_dir():
            files = sorted(
                (p.relative_to(given), p)
                for p in given.rglob("*")
                if p.suffix.lower() in IMG_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(given).parts)
                and p.is_file()
            )
            pairs = [(p, rel) for rel, p in files]
        elif given.exists():
            pairs = [(given, Path(given.name))]
        else:
            raise FileNotFoundError(f"no such file or folder: {given}")
        for path, name in pairs:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                found.append((path, name))
    if not found:
        raise ValueError(f"no image files ({' '.join(IMG_EXTENSIONS)}) in {', '.join(map(str, inputs))}")
    return found


def model_task(model: nn.Module) -> str:
    """What ``model`` predicts: ``classification``, ``segmentation`` (a dense model with more than one output
    channel) or ``depth`` (one). Raises ``ValueError`` for the others (an encoder, a detector)."""
    if isinstance(model, DensePredictor):
        return "depth" if model.out_channels == 1 else "segmentation"
    if isinstance(model, EncoderClassifier) and model.num_classes > 0:
        return "classification"
    if isinstance(model, EncoderClassifier):
        what = "a classifier without classes (num_classes=0)"
    elif hasattr(model, "blocks"):
        what = "an encoder (no classification or dense head)"
    else:
        what = f"a {type(model).__name__} model"  # a detector
    raise ValueError(f"mal predict runs classifiers and segmentation or depth models, not {what}")


@dataclass
class TopK:
    """A classifier's top-k for one image: class indices and probabilities ``(k,)``, most probable first."""

    indices: list[int]
    probs: list[float]


class Predictor:
    """``model``'s predictions on image files, read and preprocessed from its ``pretrained_cfg`` (see the module
    docstring), on ``device``.

    :meth:`read` one file -> its preprocessed image; :meth:`__call__` a list of those -> a list of predictions:
    :class:`TopK` (classification, ``topk`` clamped to the classes), class ids ``int64 (H, W)`` (segmentation) or
    depths in metres ``float32 (H, W)`` (depth), at each image's own size for dense models. ``label_names``: the class
    name of each output (those saved with the model; else the indices as text).
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu", topk: int = 5) -> None:
        self.task = model_task(model)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        encoder = model.encoder
        pcfg = model.pretrained_cfg if self.task == "classification" else encoder.pretrained_cfg
        self.channels, h, w = (int(v) for v in pcfg["input_size"])
        if self.channels not in (1, 3):
            raise ValueError(f"the model takes {self.channels}-channel images; image files give 1 or 3 channels")
        mean, std = tuple(pcfg["mean"]), tuple(pcfg["std"])
        num = model.num_classes if self.task == "classification" else model.out_channels
        names = pcfg.get("label_names") or []
        self.has_names = len(names) == num
        self.label_names = [str(n) for n in names] if self.has_names else [str(i) for i in range(num)]
        self.topk = max(1, min(int(topk), num))
        if self.task == "classification":
            if h != w:
                raise ValueError(f"the classifier takes {h}x{w} images: mal predict crops square images")
            self.crop = float(pcfg.get("crop_pct") or 1.0)
            self.load_size = math.floor(h / self.crop + 1e-6)  # as BatchAugment's centre crop computes it
            self.transform: nn.Module = BatchAugment(h, train=False, eval_crop=self.crop, mean=mean, std=std)
        else:
            self.input_size = (h, w)
            self.transform = JointAugment((h, w), train=False, mean=mean, std=std)
            self.evaluator = DenseEvaluator(self.task, model.head_settings, num)

    def read(self, path: str | Path) -> tuple[torch.Tensor, tuple[int, int]]:
        """The image at ``path`` preprocessed, float32 ``(C, h, w)`` normalized at the model's input size, and the
        size of the decoded image: a dense model's file's own ``(H, W)`` (its maps are resized back to it), a
        classifier's decoded square. Raises :data:`READ_ERRORS` for a file that cannot be read."""
        if self.task == "classification":
            x = load_image(path, self.load_size, self.channels)  # (C, L, L), L = floor(S / crop_pct)
            return self.transform(x[None])[0], tuple(x.shape[-2:])
        x = read_image(path, self.channels)  # (C, H, W) whole
        return self.transform(x[None])[0][0], tuple(x.shape[-2:])

    @torch.no_grad()
    def __call__(self, images: Sequence[tuple[torch.Tensor, tuple[int, int]]]) -> list[TopK] | list[torch.Tensor]:
        """Predictions of images from :meth:`read` (see the class docstring)."""
        x = torch.stack([img for img, _ in images]).to(self.device)  # (B, C, h, w)
        if self.task == "classification":
            probs = self.model(x).float().softmax(dim=-1).cpu()  # (B, num_classes)
            top = probs.topk(self.topk, dim=-1)
            return [TopK(i.tolist(), p.tolist()) for i, p in zip(top.indices, top.values, strict=True)]
        out = dense_predict(self.model, x, tuple(x.shape[-2:])).cpu()  # (B, K, h, w)
        preds = []
        for o, (_, size) in zip(out, images, strict=True):
            o = F.interpolate(o[None], size=size, mode="bilinear", align_corners=False)  # (1, K, H, W), as predict's
            preds.append(o[0].argmax(dim=0) if self.task == "segmentation" else self.evaluator.to_depth(o)[0])
        return preds


def iter_predictions(
    predictor: Predictor, files: Sequence[str | Path], batch_size: int
) -> Iterator[tuple[Path, TopK | torch.Tensor | BaseException]]:
    """``(file, prediction)`` for every file in order, batched by ``batch_size`` readable images; a file that cannot
    be read comes with its error instead (:data:`READ_ERRORS`), the others are still predicted."""
    pending: list[tuple[Path, tuple[torch.Tensor, tuple[int, int]]]] = []
    failed: list[tuple[Path, BaseException]] = []

    def flush() -> Iterator[tuple[Path, TopK | torch.Tensor | BaseException]]:
        preds = predictor([x for _, x in pending]) if pending else []
        done = dict(zip((p for p, _ in pending), preds, strict=True)) | dict(failed)
        for path in order:
            yield path, done[path]
        pending.clear()
        failed.clear()
        order.clear()

    order: list[Path] = []
    for path in map(Path, files):
        order.append(path)
        try:
            pending.append((path, predictor.read(path)))
        except READ_ERRORS as e:
            failed.append((path, e))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


def palette(n: int = 256) -> list[int]:
    """The colour map of PASCAL VOC's class-id PNGs (class ``i``'s bits spread over R, G, B from the top bit down):
    ``3 * n`` values, for :meth:`PIL.Image.Image.putpalette`."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


def save_mask_png(ids: torch.Tensor, path: str | Path) -> Path:
    """Class ids ``(H, W)`` as a palette PNG (:func:`palette`; the pixel value is the class id), or a 16-bit
    grayscale PNG beyond 256 classes. Written next to ``path`` and renamed into place."""
    arr = ids.cpu().numpy()
    if arr.size and arr.max() > 255:
        img = Image.fromarray(arr.astype(np.uint16))
    else:
        img = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.astype(np.uint8).tobytes())
        img.putpalette(palette())
    return atomic_write(path, lambda f: img.save(f, format="PNG"), mode="wb")


def save_depth_png(depth: torch.Tensor, path: str | Path) -> Path:
    """Depths in metres ``(H, W)`` as a 16-bit grayscale PNG of ``round(metres * DEPTH_PNG_SCALE)`` (millimetres,
    clipped to 1..65535; read back with ``np.asarray(Image.open(path)) / 1000``)."""
    mm = (depth.float().cpu().numpy() * DEPTH_PNG_SCALE).round().clip(1, 65535).astype(np.uint16)
    img = Image.fromarray(mm)
    return atomic_write(path, lambda f: img.save(f, format="PNG"), mode="wb")
