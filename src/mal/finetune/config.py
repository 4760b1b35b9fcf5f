"""The config of ``mal finetune`` (:class:`FinetuneConfig`) and the model it builds (:func:`build_model`): from a
checkpoint's weights with their architecture and token layout, from NX-AI's weights, or from ``model.name``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from mal.config import load_config
from mal.data import DataSettings
from mal.engine import ModelSettings, OptimSettings, RunSettings
from mal.models import create_encoder, create_model, model_config, vil_from_official
from mal.tasks.dense import DenseHeadSettings
from mal.tasks.detection import DetectionSettings


@dataclass
class InitSettings:
    """Where the weights come from. ``finetune``: ``checkpoint`` (a pretraining checkpoint or run folder, or any
    saved model; the encoder only): the model takes its architecture and token layout (``model.name`` and
    ``model.overrides`` may only restate them, see ``ModelSettings``); ``scratch``: ``model.name``, random init
    (the supervised baseline); ``linear_probe``: as ``finetune`` with a frozen encoder, only the head trains
    (without a checkpoint: a probe of the random ``model.name`` encoder, the probe's baseline); ``official``:
    ``checkpoint`` holds weights of NX-AI's ``VisionLSTM2`` (``.th``, ``.pth``, ``.safetensors``, also wrapped in
    ``{"state_dict": ...}``): its architecture and encoder initialize ours."""

    mode: Literal["finetune", "scratch", "linear_probe", "official"] = "finetune"
    checkpoint: str | None = None

    def validate(self) -> None:
        if self.mode == "scratch" and self.checkpoint is not None:
            raise ValueError("init.mode=scratch takes no init.checkpoint")
        if self.mode in ("finetune", "official") and self.checkpoint is None:
            raise ValueError(f"init.mode={self.mode} needs init.checkpoint (or use init.mode=scratch)")


@dataclass
class RecipeSettings:
    drop_path: float = 0.1
    mixup: float = 0.8  # Beta(alpha, alpha); 0 disables
    cutmix: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    ema_decay: float | None = 0.9999  # None: no EMA
    # MAE's probing recipe: a BatchNorm without affine parameters between the frozen features and the linear head
    # (init.mode=linear_probe only). It rescales every feature to unit variance, which features of very uneven
    # scale (MAE's) need before a linear head trained for a few epochs.
    probe_batchnorm: bool = False

    def validate(self) -> None:
        if not 0 <= self.drop_path < 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("drop_path and label_smoothing must be in [0, 1)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")


@dataclass
class FinetuneConfig:
    model: ModelSettings = field(default_factory=lambda: ModelSettings(name=None))  # None: init.checkpoint's
    task: Literal["classification", "segmentation", "depth", "detection"] = "classification"
    init: InitSettings = field(default_factory=InitSettings)
    recipe: RecipeSettings = field(default_factory=RecipeSettings)
    head: DenseHeadSettings = field(default_factory=DenseHeadSettings)
    detection: DetectionSettings = field(default_factory=DetectionSettings)  # task: detection
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(
        default_factory=lambda: OptimSettings(blr=5e-4, layer_decay=0.75, betas=(0.9, 0.999), warmup_epochs=5)
    )
    run: RunSettings = field(default_factory=lambda: RunSettings(out_dir="runs/finetune", image_every=None))

    def validate(self) -> None:
        self.init.validate()  # also when the section is left out
        r = self.recipe
        if r.probe_batchnorm and self.init.mode != "linear_probe":
            raise ValueError(f"recipe.probe_batchnorm applies to init.mode=linear_probe only, not {self.init.mode}")
        if self.task == "detection" and self.init.mode == "linear_probe":
            raise ValueError(
                "init.mode=linear_probe trains a classification head only; task=detection trains the pyramid and "
                "the detector's heads with the encoder: use init.mode=finetune (or scratch)"
            )
        if self.task == "depth" and self.head.loss == "dice_ce":
            raise ValueError("head.loss=dice_ce is a segmentation loss; task=depth regresses depth (head.loss=null)")
        if self.task != "classification" and r.mix_prob > 0 and (r.mixup > 0 or r.cutmix > 0):
            raise ValueError(f"task={self.task}: mixup/cutmix do not apply to dense labels; set recipe.mix_prob=0")
        if self.init.checkpoint is None and self.model.name is None:
            raise ValueError(
                f"init.mode={self.init.mode} without init.checkpoint trains model.name from random weights: set "
                "model.name (e.g. model.name=mal_micro)"
            )
        if self.model.name is not None:
            model_config(self.model.name, **self.model.overrides)  # a bad model option fails now


def model_overrides(cfg: FinetuneConfig, in_chans: int) -> dict[str, Any]:
    """The model config of a fine-tuning run: its input size and channels, drop path, then ``model.overrides``."""
    return {
        "image_size": cfg.data.image_size,
        "in_chans": in_chans,
        "drop_path_rate": cfg.recipe.drop_path,
        **cfg.model.overrides,
    }


def build_model(cfg: FinetuneConfig, in_chans: int, num_classes: int, *, encoder_only: bool = False) -> nn.Module:
    """The classifier (or, ``encoder_only``, the encoder of a dense run) of a fine-tuning run.

    With ``init.checkpoint`` the model is built on those weights (their architecture and token layout: fine-tuning
    keeps the pretraining's serialized order and cluster grid, at any resolution; docs/DESIGN.md, 'Fine-tuning')
    and its encoder loaded; ``model.overrides`` that contradict them are errors (a layout only with
    ``model.allow_layout_change``).
    ``model.load_report`` (or the encoder's) says what was loaded. Without a checkpoint: ``model.name``, random.
    With ``recipe.probe_batchnorm`` the head is MAE's ``Sequential(BatchNorm1d, Linear)``."""
    over = model_overrides(cfg, in_chans)
    if not encoder_only:
        over["num_classes"] = num_classes
        if cfg.recipe.probe_batchnorm:
            over["head_norm"] = "batchnorm"
    src = cfg.init.checkpoint
    if cfg.init.mode == "official":
        model = vil_from_official(src, encoder_only=encoder_only, **over).train()
    elif src is not None:
        build = create_encoder if encoder_only else create_model
        model = build(cfg.model.name, pretrained=src, allow_layout_change=cfg.model.allow_layout_change, **over)
    else:
        model = (create_encoder if encoder_only else create_model)(cfg.model.name, **over)
    return model


def load_finetune_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    return load_config(FinetuneConfig, path, overrides, kind="finetune")
