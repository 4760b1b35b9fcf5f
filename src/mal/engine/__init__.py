"""The training engine shared by every command: settings, distributed world, optimizer, checkpoints, logging, loop."""

from mal.engine.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_model_state,
    load_train_state,
    resolve_checkpoint,
    save_checkpoint,
)
from mal.engine.distributed import World, init_world
from mal.engine.logging import MetricLogger, read_metrics, save_image_grid
from mal.engine.loop import FitResult, NonFiniteLossError, StepSampler, Task, Trainer, derive_seed, seed_everything
from mal.engine.optim import build_optimizer, cosine_lr, param_groups
from mal.engine.settings import DataSettings, ModelSettings, OptimSettings, RunSettings

__all__ = [
    "DataSettings",
    "FitResult",
    "MetricLogger",
    "ModelSettings",
    "NonFiniteLossError",
    "OptimSettings",
    "RunSettings",
    "StepSampler",
    "Task",
    "Trainer",
    "World",
    "build_optimizer",
    "cosine_lr",
    "derive_seed",
    "init_world",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_state",
    "load_train_state",
    "param_groups",
    "read_metrics",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_image_grid",
    "seed_everything",
]
