"""``mal pretrain``: the config of a pretraining run and the :class:`~mal.engine.Task` that trains
:class:`~mal.pretrain.MALPretrainer` with the shared engine."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mal.config import load_config
from mal.data import denormalize
from mal.engine import DataSettings, FitResult, ModelSettings, OptimSettings, RunSettings, Task, Trainer
from mal.engine.distributed import init_world, shutdown
from mal.engine.logging import save_image_grid
from mal.engine.loop import build_splits, seed_everything
from mal.models import create_encoder
from mal.pretrain.objective import MALPretrainer, ObjectiveConfig


@dataclass
class PretrainConfig:
    """A pretraining run (``configs/pretrain/*.yaml``). ``model.name`` is a registered model whose encoder is
    pretrained (its cluster layout comes from its config); ``data.image_size`` sets its input size."""

    model: ModelSettings = field(default_factory=lambda: ModelSettings(name="mal_micro"))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=lambda: OptimSettings(weight_decay=0.05, betas=(0.9, 0.95)))
    run: RunSettings = field(default_factory=lambda: RunSettings(out_dir="runs/pretrain"))


def build_pretrainer(cfg: PretrainConfig, in_chans: int) -> MALPretrainer:
    """The encoder of ``cfg.model`` at ``cfg.data.image_size`` with ``in_chans`` channels, wrapped for pretraining."""
    overrides = {"image_size": cfg.data.image_size, "in_chans": in_chans, **cfg.model.overrides}
    return MALPretrainer(create_encoder(cfg.model.name, **overrides), cfg.objective)


class PretrainTask(Task):
    """Cluster-masked autoregressive pretraining; evaluation is the same loss on the validation split."""

    def __init__(self, cfg: PretrainConfig, channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        seed_everything(cfg.run.seed)  # the initialization is a function of the seed
        self.model = build_pretrainer(cfg, channels)
        self.set_augmentations(cfg.data, mean, std)

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": model(batch["images"])["loss"]}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        total, weight = 0.0, 0
        for batch in batches:
            n = batch["images"].shape[0]
            total += float(model(batch["images"])["loss"]) * n
            weight += n
        return {"loss": total / max(weight, 1)}

    @torch.no_grad()
    def save_images(self, model: nn.Module, batch: dict[str, torch.Tensor], path: Path) -> None:
        """Rows: the input (which is also the target), the context of the first predicted unit, the prediction of
        every unit from its predecessors (first unit shown from the input), and the absolute error."""
        images = batch["images"]
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
        save_image_grid(shown, path, title=f"{path.stem}: next-unit predictions, loss {float(out['loss']):.4f}")


def pretrain(cfg: PretrainConfig, resume: str | Path | None = None) -> FitResult:
    """Build the datasets, the model and the trainer from ``cfg`` and train (``torchrun``-aware)."""
    world = init_world(cfg.run.device)
    try:
        d = cfg.data
        train_set, val_set = build_splits(d)
        task = PretrainTask(cfg, train_set.channels, train_set.mean, train_set.std)
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
    return load_config(PretrainConfig, path, overrides)
