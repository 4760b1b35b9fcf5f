"""Config sections shared by every training command (validated from YAML by :mod:`mal.config`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mal.config import check_fields, config_changes, flatten, to_dict
from mal.data import DataSettings

__all__ = [
    "RESULT_FREE",
    "SOURCE_PATHS",
    "DataSettings",
    "ModelSettings",
    "OptimSettings",
    "RunSettings",
    "result_changes",
]

#: Config keys that do not change a run's results (resuming or reusing a run with other values is no change). The
#: run's folder is where the run is, not part of its result: a moved run resumes as itself.
RESULT_FREE = (
    "run.out_dir", "run.stop_after", "run.progress", "run.tensorboard", "run.device", "run.threads",
    "run.ckpt_minutes", "run.ckpt_every", "run.keep_ckpts", "run.log_every", "data.num_workers", "data.root",
)  # fmt: skip
#: Config keys holding the path of another run (its weights initialize this one): the same source when the paths are
#: equal, or equal relative to each config's own run folder (a sweep folder moved as a whole).
SOURCE_PATHS = ("init.checkpoint",)


def result_changes(saved: str | Path, config: Any, *, expand: Callable[[dict], dict] | None = None) -> list[str]:
    """The keys of ``config`` that would change the result of the run whose config is saved at ``saved`` (its
    ``config.yaml``): :func:`~mal.config.config_changes` without :data:`RESULT_FREE`, with the paths of
    :data:`SOURCE_PATHS` compared as moved along with the run."""
    changed = config_changes(saved, config, free=RESULT_FREE, expand=expand)
    if not any(k in SOURCE_PATHS for k in changed):
        return changed
    old, now = flatten(yaml.safe_load(Path(saved).read_text()) or {}), flatten(to_dict(config))
    return [k for k in changed if k not in SOURCE_PATHS or not _same_source(old, now, k)]


def _same_source(old: dict[str, Any], now: dict[str, Any], key: str) -> bool:
    a, b = old.get(key), now.get(key)
    if a is None or b is None:
        return a is b
    base_a, base_b = old.get("run.out_dir"), now.get("run.out_dir")
    if base_a is None or base_b is None:
        return False
    rel_a = os.path.relpath(os.path.abspath(a), os.path.abspath(base_a))
    rel_b = os.path.relpath(os.path.abspath(b), os.path.abspath(base_b))
    return rel_a == rel_b


@dataclass
class ModelSettings:
    """A registered model (``mal.list_models()``) and overrides of its config fields (the token layout's under
    ``overrides.layout``, e.g. ``model.overrides.layout.cluster_size=4``).

    Fine-tuning from a checkpoint takes the checkpoint's architecture and layout: ``name`` may then be left out
    (``None``), and ``overrides`` may only restate them (or change the input size, head, drop path, backend);
    ``allow_layout_change: true`` lets a fine-tuning run use another layout than its pretraining (an ablation)."""

    name: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    allow_layout_change: bool = False


@dataclass
class OptimSettings:
    """AdamW with warmup + cosine per step; ``lr = blr * batch_size / 256`` unless ``lr`` is given."""

    epochs: float = 10.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 64  # global: processes x micro batch x accum_steps
    accum_steps: int = 1
    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = 3.0
    layer_decay: float | None = None  # layer-wise lr decay (fine-tuning); a block pair is one layer

    def validate(self) -> None:
        b1, b2 = self.betas
        check_fields(
            self,
            epochs=(self.epochs > 0, "> 0"),
            max_steps=(self.max_steps is None or self.max_steps >= 1, ">= 1 (or null: from epochs)"),
            batch_size=(self.batch_size >= 1, ">= 1"),
            accum_steps=(self.accum_steps >= 1, ">= 1"),
            blr=(self.blr > 0, "> 0"),
            lr=(self.lr is None or self.lr > 0, "> 0 (or null: from blr)"),
            min_lr=(self.min_lr >= 0, ">= 0"),
            warmup_epochs=(self.warmup_epochs >= 0, ">= 0"),
            weight_decay=(self.weight_decay >= 0, ">= 0"),
            betas=(0 <= b1 < 1 and 0 <= b2 < 1, "two values in [0, 1)"),
            clip_grad=(self.clip_grad is None or self.clip_grad > 0, "> 0 (or null: no clipping)"),
            layer_decay=(self.layer_decay is None or 0 < self.layer_decay <= 1, "in (0, 1] (or null)"),
        )


@dataclass
class RunSettings:
    """Where outputs go and how the loop behaves."""

    out_dir: str = "runs/default"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 autocast on CUDA, float32 on CPU
    # torch.compile: false (eager), true or "model" (the whole model), "blocks" (each encoder block, see
    # mal.models.compile_blocks: the planning stays eager, so fewer graph breaks and recompiles)
    compile: bool | Literal["model", "blocks"] = False
    log_every: int = 10  # steps
    eval_every: int | None = None  # steps; None: at the end only
    ckpt_every: int = 500  # steps (and always at the end)
    keep_ckpts: int | None = 2
    image_every: int | None = 500  # reconstruction / prediction images (None: at the end only)
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps; the schedule is unchanged
    progress: bool = True
    tensorboard: bool = True
    threads: int | None = None  # torch CPU threads (None: torch's default)
    ckpt_minutes: float | None = 30.0  # also checkpoint when this many minutes passed since the last one (None: off)

    def validate(self) -> None:
        check_fields(
            self,
            out_dir=(bool(str(self.out_dir).strip()), "a folder (an empty value would write into the current one)"),
            log_every=(self.log_every >= 1, ">= 1"),
            eval_every=(self.eval_every is None or self.eval_every >= 1, ">= 1 (or null: at the end only)"),
            ckpt_every=(self.ckpt_every >= 1, ">= 1"),
            keep_ckpts=(self.keep_ckpts is None or self.keep_ckpts >= 1, ">= 1 (or null: keep all); the newest "
                        "checkpoint is always kept"),
            image_every=(self.image_every is None or self.image_every >= 1, ">= 1 (or null: at the end only)"),
            stop_after=(self.stop_after is None or self.stop_after >= 1, ">= 1 (or null)"),
            threads=(self.threads is None or self.threads >= 1, ">= 1 (or null: torch's default)"),
            ckpt_minutes=(self.ckpt_minutes is None or self.ckpt_minutes > 0, "> 0 (or null: off)"),
        )  # fmt: skip
