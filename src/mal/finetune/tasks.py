"""``mal finetune``: the training tasks of fine-tuning (classification, and segmentation / depth with a dense head)
with the MAE/ARM recipe: layer-wise lr decay, drop path, mixup/cutmix, label smoothing, EMA of weights; and the
loaders of finished fine-tuning runs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mal.config import from_dict
from mal.data import JointAugment, build_splits, denormalize
from mal.engine import FitResult, Task, Trainer
from mal.engine.checkpoint import load_model_state, load_train_state, resolve_checkpoint
from mal.engine.distributed import init_world, shutdown
from mal.engine.logging import save_image_grid
from mal.engine.loop import seed_everything
from mal.finetune.config import FinetuneConfig, build_model
from mal.models.factory import find_weights, load_weights_into, model_from_card
from mal.models.registry import expand_model_section
from mal.tasks.classification import MixupCutmix, evaluate_models, soft_cross_entropy
from mal.tasks.dense import DenseEvaluator, DensePredictor, prepare_dense
from mal.tasks.depth import colorize_depth, depth_output_bias
from mal.tasks.detection import Detector, evaluate_detector, picture_rows, prepare_detection
from mal.tasks.segmentation import colorize_mask


def load_encoder_weights(model: nn.Module, source: str | Path) -> dict[str, Any]:
    """Load the encoder of saved weights (a pretraining or fine-tuning checkpoint or run folder, a saved model or
    ``.safetensors`` file) into ``model`` (a classifier or dense model, built with the same architecture and
    layout); pretraining-only tensors are left out and counted. Returns ``{"loaded", "dropped", "new_head"}``."""
    file, card = find_weights(source)
    return load_weights_into(model.encoder, file, card)


def build_classifier(cfg: FinetuneConfig, in_chans: int, num_classes: int) -> nn.Module:
    """The classifier of a fine-tuning run (:func:`build_model`)."""
    return build_model(cfg, in_chans, num_classes)


def load_classifier(checkpoint: str | Path, *, ema: bool = False) -> tuple[nn.Module, FinetuneConfig]:
    """The classifier of a fine-tuning checkpoint (or run folder: its latest), rebuilt from the description saved
    with its weights, in eval mode, and the run's config; ``ema=True`` loads the EMA weights instead of the raw
    ones."""
    ckpt, cfg, state = read_finetune_checkpoint(checkpoint)
    _, card = find_weights(ckpt)
    if card.get("kind") != "classifier":
        raise ValueError(
            f"{ckpt} is not a classifier checkpoint (its model is a {card.get('kind')}); fine-tune it first"
        )
    model = model_from_card(card)
    model.load_state_dict(state, strict=True)
    if ema:
        load_ema_weights(model, ckpt)
    return model.eval(), cfg


def read_finetune_checkpoint(checkpoint: str | Path) -> tuple[Path, FinetuneConfig, dict[str, torch.Tensor]]:
    """The resolved checkpoint folder, its run's config and its model tensors."""
    import yaml

    ckpt = resolve_checkpoint(checkpoint)
    saved = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    if "objective" in saved:
        raise ValueError(
            f"{ckpt} is a pretraining checkpoint: fine-tune it first (mal finetune ... init.checkpoint={checkpoint}), "
            "or load its encoder with mal.load_model"
        )
    cfg = from_dict(FinetuneConfig, saved, where="checkpoint config")
    return ckpt, cfg, load_model_state(ckpt)


def load_ema_weights(model: nn.Module, ckpt: Path) -> None:
    """Replace ``model``'s weights by the EMA saved in checkpoint ``ckpt``."""
    averaged = load_train_state(ckpt).get("task", {}).get("ema")
    if averaged is None:
        raise ValueError(f"{ckpt} has no EMA weights")
    model.load_state_dict({k.removeprefix("module."): v for k, v in averaged.items() if k.startswith("module.")})


class EncoderTask(Task):
    """What every fine-tuning task shares: the encoder's initialization (``cfg.init``), the pretraining-layout
    check, layer-wise lr decay groups and the optional EMA of weights. Subclasses build ``self.model`` (with an
    ``encoder`` attribute and ``head.*`` parameters) and call :meth:`init_weights`."""

    cfg: FinetuneConfig
    ema: AveragedModel | None = None

    comparable_config = staticmethod(expand_model_section)

    def init_weights(self, *, verbose: bool = True) -> None:
        """After :func:`build_model`: report what was loaded, freeze a linear probe's encoder, start the EMA."""
        cfg = self.cfg
        encoder = self.model.encoder
        self.load_report: dict[str, Any] = getattr(self.model, "load_report", getattr(encoder, "load_report", {}))
        if verbose and self.load_report:
            rep, src = self.load_report, cfg.init.checkpoint
            what = "the official ViL" if cfg.init.mode == "official" else "the checkpoint"
            layout = encoder.cfg.layout.describe(encoder.cfg.grid)
            print(f"loaded {rep['loaded']} encoder tensors of {what} {src} ({layout}); "
                  f"left out {rep['dropped']} others (decoder, dense pretraining heads, another head)")  # fmt: skip
        if cfg.init.mode == "linear_probe":
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("head."))
        if cfg.recipe.ema_decay is not None:
            self.ema = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.recipe.ema_decay), use_buffers=True
            )

    def train_mode(self) -> None:
        """Call at the start of a training step: a linear probe keeps its frozen encoder in eval mode."""
        if self.cfg.init.mode == "linear_probe":
            self.model.encoder.eval()  # frozen features: no drop path

    def eval_models(self, model: nn.Module) -> dict[str, nn.Module]:
        """The models to evaluate, by metric prefix: ``""`` the trained weights, ``"ema_"`` their EMA."""
        models = {"": model}
        if self.ema is not None:
            models["ema_"] = self.ema.module.eval()
        return models

    def after_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def extra_state(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])


class ClassificationTask(EncoderTask):
    """Soft-target cross-entropy on mixed batches; evaluation reports top-1/top-5 of the model and its EMA."""

    def __init__(
        self, cfg: FinetuneConfig, channels: int, num_classes: int, mean, std, *, classes: Sequence[str] | None = None,
        verbose: bool = True,
    ) -> None:  # fmt: skip
        """``classes``: the data's class names, one per logit, recorded with the model (``label_names`` of its
        ``pretrained_cfg``, saved in every checkpoint's ``config.json``) together with its evaluation crop."""
        seed_everything(cfg.run.seed)
        self.cfg, self.num_classes = cfg, num_classes
        self.model = build_classifier(cfg, channels, num_classes)
        self.init_weights(verbose=verbose)
        r = cfg.recipe
        self.set_augmentations(cfg.data, mean, std)
        if classes is not None and len(classes) == num_classes:
            self.model.set_label_names(classes)
        if cfg.data.eval_crop is not None:  # timm's crop_pct: what mal predict resizes and crops images with
            self.model.encoder.pretrained_cfg["crop_pct"] = cfg.data.eval_crop
        self.mix = MixupCutmix(
            num_classes, mixup_alpha=r.mixup, cutmix_alpha=r.cutmix, prob=r.mix_prob, switch_prob=r.switch_prob,
            label_smoothing=r.label_smoothing,
        )  # fmt: skip

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.train_mode()
        images, targets = self.mix(batch["images"], batch["labels"])
        return {"loss": soft_cross_entropy(model(images), targets)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Top-1 / top-k of the model and its EMA, counted per sample, as ``mal eval`` counts them."""
        return evaluate_models(self.eval_models(model), batches, self.num_classes)


class DetectionTask(EncoderTask):
    """Mask R-CNN / Faster R-CNN (torchvision's losses, summed); evaluation: COCO AP of boxes (and masks) on the
    validation split, of the model and its EMA. Images keep their sizes: the detector resizes them (scale jitter
    from ``detection.min_size``); a horizontal flip with ``data.hflip``."""

    def __init__(self, cfg: FinetuneConfig, dataset: Any, val_set: Any = None, *, verbose: bool = True) -> None:
        seed_everything(cfg.run.seed)
        if not getattr(dataset, "detection", False):
            raise ValueError(
                f"task=detection needs a dataset of boxes and masks (coco, instances), got data.name={cfg.data.name!r}"
            )
        if cfg.detection.detector == "mask_rcnn" and not getattr(dataset, "has_masks", True):
            raise ValueError(f"dataset {cfg.data.name!r} has no instance masks: use detection.detector=faster_rcnn")
        self.cfg, self.val_set = cfg, val_set
        self.num_classes = dataset.num_classes
        self.model = build_detector(cfg, dataset)
        self.mean, self.std = tuple(dataset.mean), tuple(dataset.std)
        self.model.encoder.pretrained_cfg.update(mean=self.mean, std=self.std)
        self.init_weights(verbose=verbose)

    def prepare(self, batch: dict[str, Any], *, train: bool, device: torch.device) -> dict[str, Any]:
        """Lists of images in [0, 1] and their targets on ``device``, flipped at random in training."""
        return prepare_detection(batch, device, flip=train and self.cfg.data.hflip)

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.train_mode()
        losses = model(batch["images"], batch["targets"])
        return {"loss": sum(losses.values())}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        if self.val_set is None:
            return {}
        return evaluate_detector(self.eval_models(model), batches, self.val_set.coco, self.val_set.cat_ids)

    @torch.no_grad()
    def save_images(self, model: nn.Module, batch: dict[str, Any], path: Path) -> None:
        """Rows: the predictions (score >= 0.5) and the ground truth, drawn over the images."""
        rows = picture_rows(model, batch, self.model.classes)
        save_image_grid(rows, path, title=f"{path.stem}: detection (predictions of score >= 0.5)")


def build_detector(cfg: FinetuneConfig, dataset: Any) -> Detector:
    """The detector of a ``task: detection`` run on the encoder of :func:`build_model` (``init``)."""
    encoder = build_model(cfg, dataset.channels, 0, encoder_only=True)
    return Detector(
        encoder, dataset.num_classes, cfg.detection, mean=dataset.mean, std=dataset.std, classes=dataset.classes
    )


def load_detector(checkpoint: str | Path, *, ema: bool = False) -> tuple[Detector, FinetuneConfig]:
    """The detector of a ``task: detection`` checkpoint (or run folder: its latest) and its config; ``ema=True``
    loads the EMA weights."""
    ckpt, cfg, state = read_finetune_checkpoint(checkpoint)
    _, card = find_weights(ckpt)
    if card.get("kind") != "detector":
        raise ValueError(f"{ckpt} is not a detection checkpoint (its model is a {card.get('kind')})")
    model = Detector.from_card(card)
    model.load_state_dict(state, strict=True)
    if ema:
        load_ema_weights(model, ckpt)
    return model.eval(), cfg


class DenseTask(EncoderTask):
    """Segmentation (``head.loss``: cross-entropy or Dice + cross-entropy, ignore 255, + ``aux_weight`` x the
    auxiliary head's) or depth (masked MSE in metres or log-metres); evaluation at the labels' resolution, of the
    model and its EMA (on datasets of volumes also the per-volume DSC / HD95, :meth:`DenseEvaluator.run`)."""

    def __init__(self, cfg: FinetuneConfig, dataset: Any, *, verbose: bool = True) -> None:
        seed_everything(cfg.run.seed)
        self.cfg, self.kind = cfg, cfg.task
        if cfg.task == "segmentation" and not getattr(dataset, "has_seg", False):
            raise ValueError(f"dataset {cfg.data.name!r} has no segmentation labels")
        if cfg.task == "depth" and not getattr(dataset, "has_depth", False):
            raise ValueError(f"dataset {cfg.data.name!r} has no depth labels")
        self.evaluator, eval_size = DenseEvaluator.for_data(
            cfg.task, cfg.head, cfg.data, dataset, label_smoothing=cfg.recipe.label_smoothing
        )
        self.num_classes = self.evaluator.num_classes
        self.max_depth = float(getattr(dataset, "max_depth", 10.0))
        self.model = build_dense_model(cfg, dataset.channels, self.num_classes, self.max_depth)
        if self.kind == "segmentation" and self.evaluator.classes is not None:  # saved with the model
            self.model.encoder.pretrained_cfg["label_names"] = list(self.evaluator.classes)
        self.init_weights(verbose=verbose)
        self.set_augmentations(cfg.data, dataset.mean, dataset.std, augment=JointAugment, eval_size=eval_size)

    def prepare(self, batch: dict[str, Any], *, train: bool, device: torch.device) -> dict[str, torch.Tensor]:
        """Image, depth and mask with one joint crop and flip (:func:`~mal.tasks.dense.prepare_dense`)."""
        return prepare_dense(self.augment_train if train else self.augment_eval, batch, device)

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.train_mode()
        return {"loss": self.evaluator.loss(model(batch["images"]), self.evaluator.label(batch))}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        return self.evaluator.run(self.eval_models(model), batches)

    @torch.no_grad()
    def save_images(self, model: nn.Module, batch: dict[str, torch.Tensor], path: Path) -> None:
        """Rows: input, prediction, ground truth (class colours, or depth with near = bright), |error| for depth."""
        ev = self.evaluator
        label = ev.label(batch).cpu()
        out = ev.predict(model, batch["images"], tuple(label.shape[-2:])).cpu()
        shown = denormalize(batch["images"].float().cpu(), self.mean, self.std)
        if shown.shape[-2:] != label.shape[-2:]:
            shown = F.interpolate(shown, size=tuple(label.shape[-2:]), mode="bilinear", align_corners=False)
        if self.kind == "segmentation":
            rows = {
                "input": shown,
                "prediction": colorize_mask(out.argmax(dim=1), self.num_classes),
                "ground truth": colorize_mask(label, self.num_classes),
            }
        else:
            pred = ev.to_depth(out)
            err = torch.where(label > 0, (pred - label).abs() / self.max_depth, 0.0)
            rows = {
                "input": shown,
                "prediction": colorize_depth(pred, self.max_depth),
                "ground truth": colorize_depth(label, self.max_depth),
                "|error| / max depth": err[:, None].clamp(0, 1),
            }
        heat = {"|error| / max depth": "|prediction - truth| / max depth"} if self.kind == "depth" else None
        save_image_grid(rows, path, title=f"{path.stem}: {self.kind}", heat=heat)


def build_dense_model(
    cfg: FinetuneConfig, in_chans: int, out_channels: int, max_depth: float | None = None
) -> DensePredictor:
    """The model of a dense run; a depth head starts at ``max_depth / 2`` (its log with ``head.log_depth``)."""
    bias = None
    if cfg.task == "depth" and max_depth is not None:
        bias = depth_output_bias(max_depth / 2, log=cfg.head.log_depth)
    encoder = build_model(cfg, in_chans, 0, encoder_only=True)
    return DensePredictor(encoder, out_channels, cfg.head, out_bias=bias)


def load_dense_model(checkpoint: str | Path, *, ema: bool = False) -> tuple[DensePredictor, FinetuneConfig]:
    """The dense model of a ``task: segmentation|depth`` checkpoint (or run folder: its latest) and its config;
    ``ema=True`` loads the EMA weights."""
    ckpt, cfg, state = read_finetune_checkpoint(checkpoint)
    _, card = find_weights(ckpt)
    if card.get("kind") != "dense":
        raise ValueError(
            f"{ckpt} is not a dense checkpoint (its model is a {card.get('kind')}); load it with load_model"
        )
    model = DensePredictor.from_card(card)
    model.load_state_dict(state, strict=True)
    if ema:
        load_ema_weights(model, ckpt)
    return model.eval(), cfg


def finetune(cfg: FinetuneConfig, resume: str | Path | None = None) -> FitResult:
    """Build datasets, model and trainer from ``cfg`` and train (``torchrun``-aware); ``cfg.task`` picks
    classification (:class:`ClassificationTask`), detection (:class:`DetectionTask`) or segmentation / depth
    (:class:`DenseTask`)."""
    world = init_world(cfg.run.device)
    try:
        d = cfg.data
        train_set, val_set = build_splits(d, label_fraction=d.label_fraction, seed=cfg.run.seed)
        if cfg.task == "classification":
            task: EncoderTask = ClassificationTask(
                cfg, train_set.channels, train_set.num_classes, train_set.mean, train_set.std,
                classes=getattr(train_set, "classes", None), verbose=world.is_main,
            )  # fmt: skip
            what = f"{train_set.num_classes} classes"
        elif cfg.task == "detection":
            task = DetectionTask(cfg, train_set, val_set, verbose=world.is_main)
            what = f"{cfg.detection.detector}, {task.num_classes} classes"
        else:
            task = DenseTask(cfg, train_set, verbose=world.is_main)
            what = f"{cfg.task}, {cfg.head.kind} head" + (
                f", {task.num_classes} classes" if task.num_classes > 1 else ""
            )
        if task.ema is not None:
            task.ema.to(world.device)
        if world.is_main:
            name = task.model.encoder.pretrained_cfg.get("architecture", "the model")
            print(
                f"fine-tuning {name} ({cfg.init.mode}) on {d.name} ({len(train_set)} labelled images, "
                f"{what}, {d.image_size}px) -> {cfg.run.out_dir}"
            )
        return Trainer(task, train_set, val_set, cfg, world).fit(resume=resume)
    finally:
        shutdown(world)
