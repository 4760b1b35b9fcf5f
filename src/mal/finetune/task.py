"""``mal finetune``: classification fine-tuning of an encoder (from a MAL checkpoint, from scratch, or a linear
probe) with the MAE/ARM recipe: layer-wise lr decay, drop path, mixup/cutmix, label smoothing, EMA of weights."""

from __future__ import annotations

import re
import warnings
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
from mal.models import create_model

# the dense heads of multi-task pretraining (stage 2)
PRETRAIN_HEADS = ("depth_head.", "seg_head.")
# pretraining-only parts of a MALPretrainer (or multi-task) checkpoint: dropped (and reported) when fine-tuning
PRETRAIN_ONLY = ("decoder.", "tap_norms.", *PRETRAIN_HEADS)


@dataclass
class InitSettings:
    """Where the weights come from. ``finetune``: ``checkpoint`` (a pretraining checkpoint or run folder; the
    encoder only); ``scratch``: random init (the supervised baseline); ``linear_probe``: ``checkpoint``, frozen
    encoder, only the head trains (without a checkpoint: a probe of the random encoder, the probe's baseline);
    ``official``: ``checkpoint`` is a state dict of NX-AI's ``VisionLSTM2``
    (``.safetensors``, or ``.pth`` loaded with ``weights_only=True``); its encoder initializes ours."""

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
    model: ModelSettings = field(default_factory=lambda: ModelSettings(name="mal_micro"))
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


def load_encoder_weights(model: nn.Module, source: str | Path | dict[str, torch.Tensor]) -> dict[str, Any]:
    """Load the encoder of a pretraining checkpoint (``encoder.*`` keys) into a classifier's ``encoder``.

    Pretraining-only keys (decoder, tap norms) are dropped and counted; any other key that does not belong to
    the encoder is an error, and so is an encoder key the checkpoint lacks. The position embedding is resized
    to the classifier's grid when they differ. Returns ``{"loaded", "dropped", "source"}``.
    """
    state = dict(source) if isinstance(source, dict) else load_model_state(source)
    dropped = sorted(k for k in state if k.startswith(PRETRAIN_ONLY))
    unknown = sorted(k for k in state if not k.startswith(("encoder.", *PRETRAIN_ONLY)))
    if unknown:
        raise ValueError(f"checkpoint has keys that are neither encoder nor pretraining decoder: {unknown[:5]}")
    enc = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    result = model.encoder.load_state_dict(enc, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint encoder does not match the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return {"loaded": len(enc), "dropped": len(dropped), "source": str(source) if not isinstance(source, dict) else ""}


def official_encoder_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The encoder of an official ``VisionLSTM2`` state dict file, in our key names (``encoder.*``); its head is
    left out (fine-tuning trains a new one)."""
    from mal.models.official import _map_key

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official ViL weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    mapped = {_map_key(k): v for k, v in state.items()}
    return {k: v for k, v in mapped.items() if k.startswith("encoder.")}


def layer_id(name: str, num_layers: int) -> int:
    """Layer of a classifier parameter for lr decay: 0 = patch/position embedding, ``i + 1`` = block pair ``i``,
    ``num_layers + 1`` = final norm and head."""
    if name.startswith(("encoder.patch_embed", "encoder.pos_embed")):
        return 0
    m = re.match(r"encoder\.blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else num_layers + 1


def model_overrides(cfg: FinetuneConfig, in_chans: int) -> dict[str, Any]:
    """The model config of a fine-tuning run: its input size and channels, drop path, then ``model.overrides``."""
    return {
        "image_size": cfg.data.image_size,
        "in_chans": in_chans,
        "drop_path_rate": cfg.recipe.drop_path,
        **cfg.model.overrides,
    }


def build_classifier(cfg: FinetuneConfig, in_chans: int, num_classes: int) -> nn.Module:
    """The classifier of ``cfg``; with ``recipe.probe_batchnorm`` its ``head`` is ``Sequential(BatchNorm1d, Linear)``
    (state keys ``head.0.running_*``, ``head.1.weight``), as in MAE's linear probe."""
    model = create_model(cfg.model.name, **{"num_classes": num_classes, **model_overrides(cfg, in_chans)})
    if cfg.recipe.probe_batchnorm:
        model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    return model


def head_weight(state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The linear head's weight ``(classes, features)`` in a classifier state dict (with or without the probe's
    BatchNorm), or None when the state has no classification head."""
    return state.get("head.weight", state.get("head.1.weight"))


def load_classifier(checkpoint: str | Path, *, ema: bool = False) -> tuple[nn.Module, FinetuneConfig]:
    """The classifier of a fine-tuning checkpoint (or run folder: its latest) and the run's config; ``ema=True``
    loads the EMA weights instead of the raw ones. Channels and classes are read from the weights."""
    ckpt, cfg, state = read_finetune_checkpoint(checkpoint)
    weight = head_weight(state)
    if weight is None:
        raise ValueError(f"{ckpt} is not a classifier checkpoint (no head.weight); fine-tune it first")
    model = build_classifier(cfg, state["encoder.patch_embed.proj.weight"].shape[1], weight.shape[0])
    model.load_state_dict(state, strict=True)
    if ema:
        load_ema_weights(model, ckpt)
    return model, cfg


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
        cfg = self.cfg
        self.load_report: dict[str, Any] = {}
        if cfg.init.mode == "official":
            self.load_report = load_encoder_weights(self.model, official_encoder_state(cfg.init.checkpoint))
            if verbose:
                print(f"loaded {self.load_report['loaded']} encoder tensors of the official ViL {cfg.init.checkpoint}")
        elif cfg.init.checkpoint is not None:
            self.load_report = load_encoder_weights(self.model, cfg.init.checkpoint)
            if verbose:
                src = resolve_checkpoint(cfg.init.checkpoint)
                rep = self.load_report
                print(f"loaded {rep['loaded']} encoder tensors from {src}; dropped {rep['dropped']} pretraining-only "
                      "tensors (decoder, dense pretraining heads)")  # fmt: skip
            self._check_layout(cfg.init.checkpoint)
        if cfg.init.mode == "linear_probe":
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("head."))
        if cfg.recipe.ema_decay is not None:
            self.ema = AveragedModel(
                self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.recipe.ema_decay), use_buffers=True
            )

    def _check_layout(self, checkpoint: str) -> None:
        """Warn when the pretraining run used another scan layout than the fine-tuning model (SPEC 5: same order)."""
        import yaml

        path = resolve_checkpoint(checkpoint) / "config.yaml"
        if not path.is_file():
            return
        pre = yaml.safe_load(path.read_text()).get("model", {})
        if not pre.get("name"):
            return
        from mal.models import model_config

        keys = ("cluster_size", "cluster_grid", "cluster_order", "scan_schedule", "patch_size")
        a = model_config(pre["name"], **pre.get("overrides", {}))
        b = self.model.encoder.cfg
        diff = [k for k in keys if getattr(a, k) != getattr(b, k)]
        if diff:
            warnings.warn(
                f"the checkpoint was pretrained with another layout ({', '.join(diff)}); fine-tuning should use the "
                "pretraining's serialized order",
                stacklevel=2,
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
            print(
                f"fine-tuning {cfg.model.name} ({cfg.init.mode}) on {d.name} ({len(train_set)} labelled images, "
                f"{what}, {d.image_size}px) -> {cfg.run.out_dir}"
            )
        return Trainer(task, train_set, val_set, cfg, world).fit(resume=resume)
    finally:
        shutdown(world)


def load_finetune_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    return load_config(FinetuneConfig, path, overrides)
