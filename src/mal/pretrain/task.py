"""``mal pretrain``: the config of a pretraining run and the :class:`~mal.engine.Task` that trains
:class:`~mal.pretrain.MALPretrainer` with the shared engine."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mal.config import from_dict, load_config
from mal.data import BatchAugment, JointAugment, build_splits, denormalize
from mal.engine import DataSettings, FitResult, ModelSettings, OptimSettings, RunSettings, Task, Trainer
from mal.engine.checkpoint import load_model_state, resolve_checkpoint
from mal.engine.distributed import init_world, shutdown
from mal.engine.logging import save_image_grid
from mal.engine.loop import seed_everything
from mal.models import create_encoder, model_config
from mal.models.factory import model_from_card
from mal.models.registry import expand_model_section
from mal.pretrain.mae import MAEPretrainer
from mal.pretrain.multitask import PRETRAIN_HEADS, MultiTaskPretrainer, MultiTaskSettings
from mal.pretrain.objective import MALPretrainer, ObjectiveConfig
from mal.tasks.dense import prepare_dense


@dataclass
class PretrainInit:
    """``checkpoint``: start from the model weights of a pretraining run (stage 2 continues stage 1); the optimizer
    and the schedule start afresh. Dense heads the checkpoint lacks start from their initialization."""

    checkpoint: str | None = None


@dataclass
class PretrainConfig:
    """A pretraining run (``configs/pretrain/*.yaml``). ``model.name`` is a registered model whose encoder is
    pretrained (its cluster layout comes from its config); ``data.image_size`` sets its input size."""

    model: ModelSettings = field(default_factory=lambda: ModelSettings(name="mal_micro"))
    init: PretrainInit = field(default_factory=PretrainInit)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    multitask: MultiTaskSettings = field(default_factory=MultiTaskSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(weight_decay=0.05, betas=(0.9, 0.95)))
    run: RunSettings = field(default_factory=lambda: RunSettings(out_dir="runs/pretrain"))

    def validate(self) -> None:
        if self.model.name is None:
            raise ValueError("model.name: a pretraining run needs a registered model (e.g. model.name=mal_micro)")
        model_config(self.model.name, **self.model.overrides)  # a bad model option fails now, not at the build


def build_pretrainer(cfg: PretrainConfig, in_chans: int, num_classes: int = 0, max_depth: float = 10.0) -> nn.Module:
    """The encoder of ``cfg.model`` at ``cfg.data.image_size`` with ``in_chans`` channels, wrapped for pretraining
    (with dense heads when ``cfg.multitask`` weights a dense loss; ``num_classes`` sizes the segmentation head,
    the depth head starts at ``max_depth / 2``)."""
    overrides = {"image_size": cfg.data.image_size, "in_chans": in_chans, **cfg.model.overrides}
    encoder = create_encoder(cfg.model.name, **overrides)
    if cfg.objective.method == "mae":
        if cfg.multitask.enabled:
            raise ValueError("multi-task pretraining builds on the autoregressive objective; use objective.method=ar")
        return MAEPretrainer(encoder, cfg.objective)
    if cfg.multitask.enabled:
        return MultiTaskPretrainer(
            encoder, cfg.objective, tasks=cfg.multitask, num_classes=num_classes, depth_init=max_depth / 2
        )
    return MALPretrainer(encoder, cfg.objective)


def pretrainer_from_card(card: dict) -> nn.Module:
    """The pretraining model (encoder + decoder, and dense heads) a ``kind: pretrainer`` description names, with
    fresh weights (:func:`mal.load_model` loads them)."""
    info = card.get("pretraining") or {}
    objective = from_dict(ObjectiveConfig, info.get("objective", {}), where="model description objective")
    encoder = model_from_card(card, encoder_only=True)
    if objective.method == "mae":
        return MAEPretrainer(encoder, objective)
    dense = info.get("multitask")
    if dense:
        dense = dict(dense)
        extra = {"num_classes": dense.pop("num_classes"), "depth_init": dense.pop("depth_init")}
        tasks = from_dict(MultiTaskSettings, dense, where="model description multitask")
        return MultiTaskPretrainer(encoder, objective, tasks=tasks, **extra)
    return MALPretrainer(encoder, objective)


def load_pretrained_state(model: nn.Module, checkpoint: str | Path) -> dict[str, int]:
    """Load a pretraining checkpoint into ``model``; only dense heads may be missing (new in stage 2) or unused
    (stage 2 -> an autoregressive-only run). Returns ``{"loaded", "new", "unused"}``."""
    state = load_model_state(checkpoint)
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in [*result.missing_keys, *result.unexpected_keys] if not k.startswith(PRETRAIN_HEADS)]
    if bad:
        raise ValueError(f"checkpoint {checkpoint} does not match the pretraining model: {bad[:5]}")
    return {"loaded": len(state) - len(result.unexpected_keys), "new": len(result.missing_keys),
            "unused": len(result.unexpected_keys)}  # fmt: skip


class PretrainTask(Task):
    """Cluster-masked autoregressive pretraining (plus the dense losses of multi-task pretraining); evaluation is
    the same loss (and its parts) on the validation split."""

    def __init__(self, cfg: PretrainConfig, dataset, *, verbose: bool = True) -> None:
        seed_everything(cfg.run.seed)  # the initialization is a function of the seed
        self.cfg = cfg
        mt = cfg.multitask
        if mt.depth_weight > 0 and not getattr(dataset, "has_depth", False):
            raise ValueError(f"multitask.depth_weight > 0 but dataset {cfg.data.name!r} has no depth labels")
        if mt.seg_weight > 0 and not getattr(dataset, "has_seg", False):
            raise ValueError(f"multitask.seg_weight > 0 but dataset {cfg.data.name!r} has no segmentation labels")
        self.model = build_pretrainer(
            cfg, dataset.channels, getattr(dataset, "num_classes", 0), getattr(dataset, "max_depth", 10.0)
        )
        if cfg.init.checkpoint is not None:
            rep = load_pretrained_state(self.model, cfg.init.checkpoint)
            if verbose:
                print(
                    f"initialized from {resolve_checkpoint(cfg.init.checkpoint)}: {rep['loaded']} tensors loaded, "
                    f"{rep['new']} new (dense heads), {rep['unused']} unused"
                )
        self.dense = mt.enabled
        augment = JointAugment if self.dense else BatchAugment
        self.set_augmentations(cfg.data, dataset.mean, dataset.std, augment=augment)

    comparable_config = staticmethod(expand_model_section)

    def prepare(self, batch: dict[str, Any], *, train: bool, device: torch.device) -> dict[str, torch.Tensor]:
        """Images; with dense losses also depth and masks, with one joint crop and flip."""
        if self.dense:
            return prepare_dense(self.augment_train if train else self.augment_eval, batch, device)
        return super().prepare(batch, train=train, device=device)

    @staticmethod
    def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        """The objective on a prepared batch; dense batches (joint augmentation) also pass their depth and masks."""
        if "depth" in batch or "mask" in batch:
            return model(batch["images"], batch.get("depth"), batch.get("mask"))
        return model(batch["images"])

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": self.outputs(model, batch)["loss"]}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        total: dict[str, float] = {}
        weight = 0
        for batch in batches:
            n = batch["images"].shape[0]
            out = self.outputs(model, batch)
            for k in ("loss", "ar_loss", "depth_loss", "seg_loss"):
                if k in out:
                    total[k] = total.get(k, 0.0) + float(out[k]) * n
            weight += n
        return {k: v / max(weight, 1) for k, v in total.items()}

    @torch.no_grad()
    def save_images(self, model: nn.Module, batch: dict[str, torch.Tensor], path: Path) -> None:
        """Rows: the input (which is also the target), the context (autoregressive: of the first predicted unit;
        MAE: the visible patches), the predictions (autoregressive: every unit from its predecessors, the first
        unit shown from the input; MAE: the masked patches) and the absolute error."""
        images = batch["images"]
        what = "masked-patch predictions" if self.cfg.objective.method == "mae" else "next-unit predictions"
        out = model(images)
        rec = model.reconstruct(images, out)

        def show(x: torch.Tensor) -> torch.Tensor:
            return denormalize(x.float(), self.mean, self.std)

        shown = {
            "input = target": show(images),
            "context": show(rec["context"]),
            "prediction": show(rec["prediction"]),
            "|error|": (show(rec["prediction"]) - show(images)).abs(),
        }
        heat = {"|error|": "|prediction - input| (pixel value)"}
        save_image_grid(shown, path, title=f"{path.stem}: {what}, loss {float(out['loss']):.4f}", heat=heat)


def pretrain(cfg: PretrainConfig, resume: str | Path | None = None) -> FitResult:
    """Build the datasets, the model and the trainer from ``cfg`` and train (``torchrun``-aware)."""
    world = init_world(cfg.run.device)
    try:
        d = cfg.data
        # data.label_fraction < 1: train on that share of the images, the subset fine-tuning with the same fraction
        # and seed labels (a multi-task stage 2 then reads the dense labels of exactly those images)
        kept = {"label_fraction": d.label_fraction, "seed": cfg.run.seed} if d.label_fraction < 1 else {}
        train_set, val_set = build_splits(d, **kept)
        task = PretrainTask(cfg, train_set, verbose=world.is_main)
        if world.is_main:
            n_enc = sum(p.numel() for p in task.model.encoder.parameters())
            n_dec = sum(p.numel() for n, p in task.model.named_parameters() if not n.startswith("encoder."))
            print(
                f"pretraining {cfg.model.name} ({n_enc / 1e6:.2f}M encoder + {n_dec / 1e6:.2f}M decoder params) on "
                f"{d.name} ({len(train_set)} images, {d.image_size}px) -> {cfg.run.out_dir}"
            )
        return Trainer(task, train_set, val_set, cfg, world).fit(resume=resume)
    finally:
        shutdown(world)


def load_pretrain_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    return load_config(PretrainConfig, path, overrides, kind="pretrain")
