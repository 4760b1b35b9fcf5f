"""``mal finetune``: classification fine-tuning of an encoder (from a MAL checkpoint, from scratch, or a linear
probe) with the MAE/ARM recipe: layer-wise lr decay, drop path, mixup/cutmix, label smoothing, EMA of weights."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics.classification import MulticlassAccuracy

from mal.config import load_config
from mal.engine import DataSettings, FitResult, ModelSettings, OptimSettings, RunSettings, Task, Trainer
from mal.engine.checkpoint import load_model_state, load_train_state, resolve_checkpoint
from mal.engine.distributed import init_world, shutdown
from mal.engine.loop import build_splits, seed_everything
from mal.engine.optim import param_groups
from mal.finetune.mix import MixupCutmix, soft_cross_entropy
from mal.models import create_encoder, create_model, model_config, vil_from_official
from mal.models.factory import find_weights, load_weights_into, model_from_card


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
class DenseHeadSettings:
    """The head of ``task: segmentation | depth`` (SPEC 5). ``upernet``: UperNet on a feature pyramid from block
    pairs 4, 6, 8, 12 of 12 (scaled to the depth) rescaled to 4x/2x/1x/0.5x, with an auxiliary FCN head on the
    third level (segmentation only, loss weight ``aux_weight``); ``linear``: LayerNorm + a linear map per token to
    its patch's pixels (quick runs, and the multi-task pretraining heads)."""

    kind: Literal["linear", "upernet"] = "upernet"
    channels: int = 256  # UperNet width
    dropout: float = 0.1
    aux_weight: float = 0.4
    log_depth: bool = False  # depth: regress log-depth (the loss is MSE in log space) instead of metres
    inference: Literal["whole", "slide"] = "whole"  # slide: windows of data.image_size over data.load_size images
    slide_stride: int | None = None  # slide: window stride in pixels (None: 2/3 of the window)


@dataclass
class FinetuneConfig:
    model: ModelSettings = field(default_factory=lambda: ModelSettings(name=None))  # None: init.checkpoint's
    task: Literal["classification", "segmentation", "depth"] = "classification"
    init: InitSettings = field(default_factory=InitSettings)
    recipe: RecipeSettings = field(default_factory=RecipeSettings)
    head: DenseHeadSettings = field(default_factory=DenseHeadSettings)
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

    With ``init.checkpoint`` the model is built on those weights (their architecture and token layout, SPEC 5:
    fine-tuning keeps the pretraining's serialized order and cluster grid, at any resolution) and its encoder
    loaded; ``model.overrides`` that contradict them are errors (a layout only with ``model.allow_layout_change``).
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


def layer_id(name: str, num_layers: int) -> int:
    """Layer of a classifier parameter for lr decay: 0 = patch/position embedding, ``i + 1`` = block pair ``i``,
    ``num_layers + 1`` = final norm and head."""
    if name.startswith(("encoder.patch_embed", "encoder.pos_embed")):
        return 0
    m = re.match(r"encoder\.blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else num_layers + 1


def load_encoder_weights(model: nn.Module, source: str | Path) -> dict[str, Any]:
    """Load the encoder of saved weights (a pretraining or fine-tuning checkpoint or run folder, a saved model or
    ``.safetensors`` file) into ``model`` (a classifier or dense model, built with the same architecture and
    layout); pretraining-only tensors are left out and counted. Returns ``{"loaded", "dropped", "new_head"}``."""
    file, card = find_weights(source)
    return load_weights_into(model.encoder, file, card)


def build_classifier(cfg: FinetuneConfig, in_chans: int, num_classes: int) -> nn.Module:
    """The classifier of a fine-tuning run (:func:`build_model`)."""
    return build_model(cfg, in_chans, num_classes)


def head_weight(state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The linear head's weight ``(classes, features)`` in a classifier state dict (with or without the probe's
    BatchNorm), or None when the state has no classification head."""
    return state.get("head.weight", state.get("head.1.weight"))


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

    from mal.config import from_dict

    ckpt = resolve_checkpoint(checkpoint)
    cfg = from_dict(FinetuneConfig, yaml.safe_load((ckpt / "config.yaml").read_text()), where="checkpoint config")
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

    def param_groups(self, weight_decay: float, layer_decay: float | None) -> list[dict]:
        n = self.model.encoder.num_layers
        return param_groups(
            self.model, weight_decay, layer_id=lambda name: layer_id(name, n), num_layers=n, layer_decay=layer_decay
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

    def __init__(self, cfg: FinetuneConfig, channels: int, num_classes: int, mean, std, *, verbose: bool = True):
        seed_everything(cfg.run.seed)
        self.cfg, self.num_classes = cfg, num_classes
        self.model = build_classifier(cfg, channels, num_classes)
        self.init_weights(verbose=verbose)
        r = cfg.recipe
        self.set_augmentations(cfg.data, mean, std)
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
        models = self.eval_models(model)
        k = min(5, self.num_classes)
        metrics = {
            p: (MulticlassAccuracy(self.num_classes, top_k=1), MulticlassAccuracy(self.num_classes, top_k=k))
            for p in models
        }
        loss, n = 0.0, 0
        for batch in batches:
            for p, m in models.items():
                logits = m(batch["images"]).float().cpu()
                labels = batch["labels"].cpu()
                metrics[p][0].update(logits, labels)
                metrics[p][1].update(logits, labels)
                if not p:
                    loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                    n += labels.shape[0]
        out = {"loss": loss / max(n, 1)}
        for p, (top1, top5) in metrics.items():
            out[f"{p}top1"] = float(top1.compute()) * 100
            out[f"{p}top{k}"] = float(top5.compute()) * 100
        return out


def finetune(cfg: FinetuneConfig, resume: str | Path | None = None) -> FitResult:
    """Build datasets, model and trainer from ``cfg`` and train (``torchrun``-aware); ``cfg.task`` picks
    classification (:class:`ClassificationTask`) or segmentation / depth (:class:`~mal.finetune.dense.DenseTask`)."""
    world = init_world(cfg.run.device)
    try:
        d = cfg.data
        train_set, val_set = build_splits(d, label_fraction=d.label_fraction, seed=cfg.run.seed)
        if cfg.task == "classification":
            task: EncoderTask = ClassificationTask(
                cfg, train_set.channels, train_set.num_classes, train_set.mean, train_set.std, verbose=world.is_main
            )
            what = f"{train_set.num_classes} classes"
        else:
            from mal.finetune.dense import DenseTask

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


def load_finetune_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    return load_config(FinetuneConfig, path, overrides)
