"""The training loop shared by every training command.

A :class:`Task` says what is trained (its ``model``), how a batch becomes a loss, how to evaluate and what images
to draw; :class:`Trainer` does the rest: sharded sampling, gradient accumulation, AdamW with warmup + cosine per
step, gradient clipping, bf16 autocast on CUDA, ``torchrun`` DDP, progress bar, metrics, atomic checkpoints, exact
resume, and a stop with a clear message on a non-finite loss.

Reproducibility: the data order is a function of ``(seed, epoch)``; a sample augmented in the loader (a crop
from the full image, RandAugment) draws from a seed of ``(seed, epoch, index)`` that travels with its index; every
optimizer step reseeds the global RNGs from ``(seed, step, rank)`` for the batch augmentation (crops of in-memory
datasets, flips, erasing) and scan orders. So a run resumed at step ``k`` draws exactly what the uninterrupted run
draws (the RNG states are saved in the checkpoint as well), and the per-sample draws do not depend on the number of
processes or loader workers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from mal.config import config_hash, config_yaml
from mal.data import BadImageWarning, BadSampleCounter, BatchAugment, collate, loader_workers
from mal.data.collate import BadDataLimit
from mal.engine.checkpoint import (
    CheckpointWriteError,
    CorruptCheckpointError,
    latest_checkpoint,
    load_model_state,
    load_train_state,
    loadable_checkpoints,
    recover,
    rng_state,
    save_checkpoint,
    set_aside,
    set_rng_state,
)
from mal.engine.distributed import World, barrier, init_world
from mal.engine.logging import MetricLogger
from mal.engine.optim import build_optimizer, cosine_lr, param_groups, set_lr
from mal.engine.settings import DataSettings, OptimSettings, RunSettings, result_changes
from mal.io import FolderInUseError, FolderLock, atomic_write, code_version, write_json


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped without applying the step."""


class RunInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run at a step boundary, after a checkpoint; ``signal`` is the signal number."""

    def __init__(self, message: str, signal: int) -> None:
        super().__init__(message)
        self.signal = signal


class BadDataError(ValueError):
    """Too many images could not be read; the run stopped with a checkpoint of the last good step."""


class ResourceError(RuntimeError):
    """The run ran out of a resource of the machine (memory; a data-loader worker killed); the message names it,
    says what to change and names the last checkpoint."""


OUT_OF_MEMORY: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError,
)  # fmt: skip
OOM_HINT = (
    "lower the batch per process: optim.accum_steps=2 or more keeps the global batch (and the results), or lower "
    "optim.batch_size or data.image_size"
)
WORKER_HINT = (
    "often the out-of-memory killer (see dmesg) or a crash while decoding a file: lower data.num_workers, or try "
    "data.num_workers=0 to see the error in the training process"
)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (``numpy.random.SeedSequence``: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


#: Tags the per-sample seeds, so that ``derive_seed(seed, epoch, index, tag)`` never equals a step's seed.
_SAMPLE_STREAM = 0x5A3B1E


class StepSampler(Sampler[list[int] | list[tuple[int, int]]]):
    """Micro-batches of one process for whole optimizer steps.

    Each epoch is a permutation of the dataset drawn from ``(seed, epoch)``, cut into ``steps_per_epoch`` global
    batches of ``global_batch`` indices (the tail that does not fill one is dropped). Process ``rank`` takes its
    contiguous share of every global batch and yields it as ``accum_steps`` micro-batches, so the union over
    processes and micro-batches of one step is exactly one global batch, whatever the number of processes.
    :meth:`set_epoch` with ``start_step`` skips the steps already done (mid-epoch resume).

    ``sample_seeds=True`` (for datasets that augment each sample, ``dataset.seeded_samples``) yields ``(index,
    sample_seed)`` keys, the seed derived from ``(seed, epoch, index)``: a sample's random crop is then the same
    whichever process or loader worker decodes it, and a resumed run redraws it exactly.
    """

    def __init__(
        self, num_samples: int, global_batch: int, *, world_size: int = 1, rank: int = 0, accum_steps: int = 1,
        seed: int = 0, shuffle: bool = True, sample_seeds: bool = False,
    ) -> None:  # fmt: skip
        if global_batch % (world_size * accum_steps):
            raise ValueError(
                f"optim.batch_size={global_batch} must be divisible by processes x accum_steps "
                f"= {world_size} x {accum_steps}"
            )
        if num_samples < global_batch:
            raise ValueError(
                f"the dataset has {num_samples} images, fewer than one global batch (optim.batch_size={global_batch})"
            )
        self.num_samples, self.global_batch = num_samples, global_batch
        self.world_size, self.rank, self.accum_steps = world_size, rank, accum_steps
        self.micro = global_batch // (world_size * accum_steps)
        self.seed, self.shuffle, self.sample_seeds = seed, shuffle, sample_seeds
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def sample_seed(self, index: int) -> int:
        """The seed of sample ``index``'s augmentation in the current epoch."""
        return derive_seed(self.seed, self.epoch, index, _SAMPLE_STREAM)

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5A11))
            perm = torch.randperm(self.num_samples, generator=g)
        else:
            perm = torch.arange(self.num_samples)
        share = self.global_batch // self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            batch = perm[step * self.global_batch : (step + 1) * self.global_batch]
            mine = batch[self.rank * share : (self.rank + 1) * share]
            for a in range(self.accum_steps):
                micro = mine[a * self.micro : (a + 1) * self.micro].tolist()
                yield [(i, self.sample_seed(i)) for i in micro] if self.sample_seeds else micro

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_steps


class Task:
    """What a training command trains. Subclasses set ``model`` and the two augmentations and implement
    :meth:`training_step`, :meth:`evaluate` and :meth:`save_images`.

    The checkpoint's ``model.safetensors`` is ``task.model.state_dict()``.
    """

    model: nn.Module
    augment_train: Callable
    augment_eval: Callable
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def set_augmentations(
        self, data: DataSettings, mean: tuple[float, ...], std: tuple[float, ...], *, augment: type = BatchAugment,
        eval_size: int | tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        """The train (random resized crop unless the loader crops each sample, flip, normalize, random erasing) and
        eval (resize to ``eval_size``, default ``data.image_size``, or with ``data.eval_crop`` resize and centre crop;
        normalize) transforms of ``data``, of class ``augment`` (tasks with dense labels pass
        :class:`~mal.data.JointAugment` and prepare their batches themselves; it has no erasing, centre crop or
        per-sample crops). The normalization is recorded in the model's ``pretrained_cfg``, which is saved with its
        weights."""
        self.mean, self.std = tuple(mean), tuple(std)
        size = data.image_size if eval_size is None else eval_size
        common = {"mean": mean, "std": std, "scale": data.crop_scale, "ratio": data.crop_ratio, "hflip": data.hflip}
        if issubclass(augment, BatchAugment):
            if data.color_jitter is not None:
                raise ValueError("data.color_jitter applies to dense tasks (segmentation, depth) only")
            self.augment_train = BatchAugment(
                data.image_size, train=True, crop=not data.sample_augmented, erase_prob=data.erase_prob, **common
            )
            self.augment_eval = BatchAugment(size, train=False, eval_crop=data.eval_crop, mean=mean, std=std)
        else:
            unsupported = {
                "data.erase_prob": data.erase_prob > 0, "data.eval_crop": data.eval_crop is not None,
                f"data.name={data.name} (crops in the loader)": data.sample_augmented,
            }  # fmt: skip
            if any(unsupported.values()):
                names = ", ".join(k for k, v in unsupported.items() if v)
                raise ValueError(f"{names}: not available with dense labels ({augment.__name__})")
            self.augment_train = augment(data.image_size, train=True, color_jitter=data.color_jitter, **common)
            self.augment_eval = augment(size, train=False, mean=mean, std=std)
        encoder = getattr(self.model, "encoder", None)
        if isinstance(getattr(encoder, "pretrained_cfg", None), dict):
            encoder.pretrained_cfg.update(mean=self.mean, std=self.std)

    def prepare(self, batch: dict[str, Any], *, train: bool, device: torch.device) -> dict[str, torch.Tensor]:
        """A collated batch (uint8 images) -> ``{"images": normalized float (B, C, S, S), "labels": (B,)}``."""
        augment = self.augment_train if train else self.augment_eval
        out = {"images": augment(batch["images"].to(device, non_blocking=True))}
        if batch.get("labels") is not None:
            out["labels"] = batch["labels"].to(device, non_blocking=True)
        return out

    def training_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``model`` is ``self.model`` possibly wrapped (DDP, compiled). Returns ``loss`` and scalar metrics."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        raise NotImplementedError

    @torch.no_grad()
    def save_images(self, model: nn.Module, batch: dict[str, torch.Tensor], path: Path) -> None:
        """Draw a figure of ``batch`` (prepared, eval augmentation) to ``path``; optional."""

    def param_groups(self, weight_decay: float, layer_decay: float | None) -> list[dict]:
        """AdamW groups of ``self.model`` (:func:`~mal.engine.optim.param_groups`: layer decay asks the model)."""
        return param_groups(self.model, weight_decay, layer_decay=layer_decay)

    def comparable_config(self, config: dict) -> dict:
        """A run config (as a dict) in the form resumed configs are compared in; tasks that build models from a
        ``model`` section expand it to the model as built."""
        return config

    def model_card(self) -> dict[str, Any] | None:
        """The model's description saved with its weights (``config.json``): the model's ``mal_card()``."""
        card = getattr(self.model, "mal_card", None)
        return card() if callable(card) else None

    def extra_state(self) -> dict[str, Any]:
        """Task state saved in checkpoints besides the model (e.g. an EMA)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (e.g. an EMA update)."""


@dataclass
class StepResult:
    """What one optimizer step gives the loop (every process the same, see :meth:`Trainer._agree`)."""

    lr: float
    loss: float
    grad_norm: torch.Tensor | None
    images: int  # this process's images that trained (not counting a stand-in batch)
    signal: int  # the signal that asked the run to stop (0: none)
    due: bool  # run.ckpt_minutes passed since the last checkpoint


@dataclass
class FitResult:
    step: int
    finished: bool  # the schedule ran to its end (False: stopped by run.stop_after)
    checkpoint: Path | None
    train_loss: float | None
    val: dict[str, float]
    seconds: float


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    """Runs a :class:`Task` under the ``optim``/``run``/``data`` settings of ``config`` (a dataclass with those
    sections; saved, resolved, with every checkpoint).

    ``fit(resume=None)``: ``resume`` is a checkpoint folder, a run folder (its latest checkpoint) or ``"auto"``
    (``run.out_dir``'s latest). A fresh run refuses an ``out_dir`` that already holds checkpoints.
    """

    def __init__(
        self, task: Task, train_set: Dataset, val_set: Dataset | None, config: Any, world: World | None = None
    ) -> None:
        self.task, self.train_set, self.val_set, self.config = task, train_set, val_set, config
        self.optim: OptimSettings = config.optim
        self.run: RunSettings = config.run
        self.data: DataSettings = config.data
        self.world = world or init_world(self.run.device)
        self.out_dir = Path(self.run.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.config_yaml = config_yaml(config)
        self.sampler = StepSampler(
            len(train_set), self.optim.batch_size, world_size=self.world.size, rank=self.world.rank,
            accum_steps=self.optim.accum_steps, seed=self.run.seed,
            sample_seeds=bool(getattr(train_set, "seeded_samples", False)),
        )  # fmt: skip
        spe = self.sampler.steps_per_epoch
        self.total_steps = self.optim.max_steps or max(1, math.ceil(self.optim.epochs * spe))
        self.warmup_steps = min(self.total_steps, round(self.optim.warmup_epochs * spe))
        self.base_lr = self.optim.lr if self.optim.lr is not None else self.optim.blr * self.optim.batch_size / 256
        self.bad = BadSampleCounter(self.data.max_bad_fraction, population=len(train_set))
        self._last_raw: dict[str, Any] | None = None
        self._signal = 0
        self._val_loader: DataLoader | None = None

    # ---------------------------------------------------------------- helpers
    def _loader(self, dataset: Dataset, batch_sampler: Sampler | None = None, batch_size: int = 1) -> DataLoader:
        """A loader of ``dataset`` with ``data.num_workers`` persistent workers (:func:`~mal.data.loader_workers`:
        None shares the CPUs among the node's processes)."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = loader_workers(self.data, local)
        kw: dict[str, Any] = {"num_workers": workers, "collate_fn": collate}
        kw["pin_memory"] = self.world.device.type == "cuda"
        if workers > 0:
            kw["persistent_workers"] = True
        if batch_sampler is not None:
            return DataLoader(dataset, batch_sampler=batch_sampler, **kw)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, **kw)

    def _eval_batches(self, loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
        for batch in loader:
            if batch["images"] is not None:
                yield self.task.prepare(batch, train=False, device=self.world.device)

    def _save(self, step: int, epoch_step: tuple[int, int], *, name: str | None = None) -> Path | None:
        """Checkpoint the state after ``step`` optimizer steps (``name``: a labelled state, not a checkpoint)."""
        path = None
        if self.world.is_main:
            state = {
                "step": step,
                "epoch": epoch_step[0],
                "total_steps": self.total_steps,
                "optimizer": self.optimizer.state_dict(),
                "rng": rng_state(),
                "bad_samples": self.bad.state_dict(),
                "config_hash": config_hash(self.config),
                "task": self.task.extra_state(),
                "log_window": dict(self._window),
            }
            path = save_checkpoint(
                self.ckpt_dir, step, self.task.model.state_dict(), state, self.config_yaml, keep=self.run.keep_ckpts,
                model_card=self.task.model_card(), name=name,
            )  # fmt: skip
        self._last_save = time.monotonic()
        barrier(self.world)
        return path

    def _resume_candidates(self, resume: str | Path) -> list[Path]:
        """The checkpoints a resume tries, newest first: a checkpoint folder alone, else every complete checkpoint
        of the run folder (``"auto"``: ``run.out_dir``)."""
        path = self.out_dir if str(resume) == "auto" else Path(resume)
        if (path / "model.safetensors").is_file() or (path / "state.pt").is_file():
            return [path]
        for folder in (path / "checkpoints", path):
            recover(folder)
            found = loadable_checkpoints(folder)
            if found:
                return found
        raise FileNotFoundError(f"no checkpoint found at {path} (expected a step_* folder with model.safetensors)")

    def _resume(self, resume: str | Path) -> int:
        """Load the newest readable checkpoint of ``resume``: a corrupt or truncated one is set aside (renamed
        ``corrupt_step_X``, see :func:`~mal.engine.checkpoint.set_aside`) with a warning, for the one before it. A
        checkpoint of another kind of run (fine-tuning resumed by pretraining) or of another model (another decoder
        width) is a ``ValueError`` naming what differs."""
        candidates = self._resume_candidates(resume)
        unreadable = []
        for i, path in enumerate(candidates):
            try:
                model_state, state = load_model_state(path), load_train_state(path)
                break
            except CorruptCheckpointError as e:
                if i + 1 == len(candidates):
                    raise CorruptCheckpointError(f"no readable checkpoint to resume from: {e}") from e
                unreadable.append(path)
                if self.world.is_main:
                    kept = f"corrupt_{path.name}" if path.parent == self.ckpt_dir else path.name
                    warnings.warn(
                        f"{e}; resuming from the checkpoint before it, {candidates[i + 1]} (the unreadable one is "
                        f"kept as {kept})",
                        stacklevel=3,
                    )
        barrier(self.world)  # every process has read its checkpoint before the unreadable ones move
        if self.world.is_main:
            for bad in unreadable:
                if bad.parent == self.ckpt_dir:
                    set_aside(bad)  # no longer a checkpoint: retention and later resumes skip it
        self._check_resumable(path, model_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.bad.load_state_dict(state["bad_samples"])
        self.task.load_extra_state(state.get("task", {}))
        self._window.update(state.get("log_window", {}))
        set_rng_state(state["rng"])
        changed = result_changes(path / "config.yaml", self.config, expand=self.task.comparable_config)
        if changed and self.world.is_main:
            warnings.warn(
                f"resuming {path} with a different config ({', '.join(changed)}): the result will differ from an "
                "uninterrupted run",
                stacklevel=3,
            )
        if self.world.is_main:
            print(f"resumed from {path} at step {state['step']}")
        return int(state["step"])

    def _check_resumable(self, path: Path, model_state: dict[str, torch.Tensor]) -> None:
        """Load ``model_state`` into the task's model, or say in one line why the checkpoint is not this run's."""
        ours = (self.task.model_card() or {}).get("kind")
        card = path / "config.json"
        theirs = json.loads(card.read_text()).get("kind") if card.is_file() else None
        if ours and theirs and ours != theirs:
            command = "mal pretrain" if theirs == "pretrainer" else "mal finetune"
            raise ValueError(
                f"{path} is a checkpoint of a {theirs} run, this run trains a {ours}: continue it with {command} "
                f"--resume {path.parent.parent if path.parent.name == 'checkpoints' else path}"
            )
        try:
            self.task.model.load_state_dict(model_state, strict=True)
        except RuntimeError as e:
            changed = result_changes(path / "config.yaml", self.config, expand=self.task.comparable_config)
            why = f"the config differs in {', '.join(changed)}" if changed else str(e).splitlines()[0]
            raise ValueError(
                f"{path} does not fit the model this config builds ({why}); resume with the run's own config "
                "(--resume RUN without overrides of the model)"
            ) from None

    def _check_writable(self) -> None:
        """Before training: ``run.out_dir`` and its ``checkpoints`` folder can be written, with room for a
        checkpoint (the model, twice its size for AdamW's moments, and an EMA copy when the task keeps one)."""
        if not self.world.is_main:
            return
        model_bytes = sum(t.numel() * t.element_size() for t in self.task.model.state_dict().values())
        need = model_bytes * (4 if self.task.extra_state() else 3)
        for folder in (self.out_dir, self.ckpt_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write-test-{os.getpid()}"
                probe.write_bytes(b"0")
                probe.unlink()
            except OSError as e:
                raise CheckpointWriteError(f"cannot write to {folder}: {e.strerror or e}") from e
        free = shutil.disk_usage(self.ckpt_dir).free
        if free < need:
            raise CheckpointWriteError(
                f"not enough space for a checkpoint in {self.ckpt_dir}: {free / 2**20:.0f} MiB free, "
                f"about {need / 2**20:.0f} MiB needed"
            )

    def _sample_batch(self) -> dict[str, torch.Tensor] | None:
        """8 images drawn across the validation split (or the training one), the same at every call: the first 8 of
        a class-sorted folder would all be of one class."""
        source = self.val_set if self.val_set is not None else self.train_set
        g = torch.Generator().manual_seed(derive_seed(self.run.seed, 0x1AA6E))
        picked = sorted(torch.randperm(len(source), generator=g)[: min(8, len(source))].tolist())
        items = [source[i] for i in picked]
        batch = collate(items)
        return None if batch["images"] is None else self.task.prepare(batch, train=False, device=self.world.device)

    def _evaluate(self, model: nn.Module, step: int, logger: MetricLogger | None) -> dict[str, float]:
        if self.val_set is None or not self.world.is_main:
            barrier(self.world)
            return {}
        seed_everything(derive_seed(self.run.seed, 0xE7A1))  # the same evaluation at every step
        model.eval()
        if self._val_loader is None:
            self._val_loader = self._loader(self.val_set, batch_size=self.optim.batch_size // self.world.size)
        loader = self._val_loader
        with _autocast(self.world.device, self.run.amp):
            metrics = self.task.evaluate(model, self._eval_batches(loader))
        model.train()
        if logger is not None:
            logger.log(step, metrics, split="val")
        barrier(self.world)
        return metrics

    def _images(self, model: nn.Module, step: int, logger: MetricLogger | None = None) -> None:
        if self.world.is_main:
            batch = self._sample_batch()
            if batch is not None:
                seed_everything(derive_seed(self.run.seed, 0x1AA6E))
                model.eval()
                path = self.out_dir / "images" / f"step_{step:08d}.png"
                with _autocast(self.world.device, self.run.amp):
                    self.task.save_images(model, batch, path)
                model.train()
                if logger is not None and path.is_file():
                    logger.log_image("images", path, step)
        barrier(self.world)

    # ---------------------------------------------------------------- the loop
    def _step(self, wrapped: nn.Module, micro_batches: Iterator[dict[str, Any]], step: int, epoch: int) -> StepResult:
        """One optimizer step over ``accum_steps`` micro-batches. Raises :class:`NonFiniteLossError` on a NaN/inf
        loss or gradient (the step is not applied), and :class:`BadDataError` when too many images were unreadable
        (after a checkpoint of the state before the step, whose counts leave this step's batch out: a resume after
        the files are fixed redoes it).

        Under DDP every process takes part in one all-reduce per step (the loss, the good and bad image counts of the
        step, the stop signals and the checkpoint clock), so all of them judge the same numbers and stop together;
        a process whose micro-batch was unreadable as a whole still joins the gradient all-reduce, with a stand-in
        batch whose loss is weighted 0 (its gradient share is zero that step)."""
        run, optim, world = self.run, self.optim, self.world
        seed_everything(derive_seed(run.seed, step, world.rank))
        lr = cosine_lr(
            step, base_lr=self.base_lr, min_lr=optim.min_lr, warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
        )  # fmt: skip
        set_lr(self.optimizer, lr)
        loss_sum, images, good, bad = torch.zeros((), device=world.device), 0, 0, 0
        for a in range(optim.accum_steps):
            raw = next(micro_batches)
            bad += raw["num_bad"]
            weight = 1.0
            if raw["images"] is None:
                if not world.distributed:
                    continue
                raw, weight = self._stand_in(), 0.0
            else:
                good += len(raw["images"])  # a tensor (B, ...) or a list (detection)
                if world.distributed:
                    self._last_raw = raw
            batch = self.task.prepare(raw, train=True, device=world.device)
            sync = a == optim.accum_steps - 1 or not world.distributed
            with contextlib.nullcontext() if sync else wrapped.no_sync(), _autocast(world.device, run.amp):
                loss = self.task.training_step(wrapped, batch)["loss"] * (weight / optim.accum_steps)
            loss.backward()
            loss_sum += loss.detach()
            images += len(batch["images"]) if weight else 0
        grad_norm = None
        if optim.clip_grad is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.task.model.parameters(), optim.clip_grad)
        minutes = run.ckpt_minutes
        due = minutes is not None and time.monotonic() - self._last_save >= 60 * minutes
        loss_value, good, bad, signum, due = self._agree(loss_sum, good, bad, self._signal, due)
        counts = self.bad.state_dict()
        self.bad.add(good, bad)
        if self.bad.over:
            message = str(self._bad_limit())
            self.bad.load_state_dict(counts)  # the step is redone on resume: its batch must not count twice
            self.optimizer.zero_grad(set_to_none=True)
            path = self._save(step, (epoch, step % self.sampler.steps_per_epoch))  # the state before this step
            raise BadDataError(
                f"{message}; stopped at step {step} with checkpoint {path or self.ckpt_dir}: fix or remove the "
                "files, then continue with --resume"
            )
        if not math.isfinite(loss_value) or (grad_norm is not None and not torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(self._diverged(step, epoch, lr, loss_value, grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(lr, loss_value, grad_norm, images, signum, due)

    def _bad_limit(self) -> str:
        try:
            self.bad.check()
        except BadDataLimit as e:
            return str(e)
        return ""

    def _agree(
        self, loss_sum: torch.Tensor, good: int, bad: int, signum: int, due: bool
    ) -> tuple[float, int, int, int, bool]:
        """What every process must agree on after a step, in one all-reduce under DDP: the mean loss, the summed
        good and bad image counts, the signal that asked to stop (SIGTERM wins over SIGINT; 0 when none did) and
        whether ``run.ckpt_minutes`` passed on any process. A single process reads its own values (one device sync
        for the loss, as before)."""
        if not self.world.distributed:
            return float(loss_sum), good, bad, signum, due
        values = [loss_sum.double(), *(torch.tensor(float(v), dtype=torch.float64, device=loss_sum.device) for v in
                  (good, bad, signum == signal.SIGTERM, signum == signal.SIGINT, due))]  # fmt: skip
        flat = torch.stack(values)
        torch.distributed.all_reduce(flat)
        loss, good, bad, term, intr, due = flat.tolist()
        signum = signal.SIGTERM if term else signal.SIGINT if intr else 0
        return loss / self.world.size, int(good), int(bad), int(signum), bool(due)

    def _stand_in(self) -> dict[str, Any]:
        """A readable micro-batch for a process whose own was unreadable as a whole (DDP): its last good one, or
        the first readable sample of the training set."""
        if self._last_raw is None:
            keys = ((i, 0) if self.sampler.sample_seeds else i for i in range(len(self.train_set)))
            item = next((it for k in keys if (it := self.train_set[k])[0] is not None), None)
            if item is None:
                raise BadDataError("no image of the training set could be read")
            self._last_raw = collate([item])
        return self._last_raw

    def _diverged(self, step: int, epoch: int, lr: float, loss: float, grad_norm: torch.Tensor | None) -> str:
        """The message of a non-finite stop. The weights in memory may already be the product of an exploding
        update, so they are no checkpoint: they are kept, labelled, as ``diverged_step_<step>`` for inspection, and
        the checkpoints (the last good state) are left as they are, none pruned."""
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {float(grad_norm)}"
        kept = self._save(step, (epoch, step % self.sampler.steps_per_epoch), name=f"diverged_step_{step:08d}")
        last = latest_checkpoint(self.ckpt_dir)
        good = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was written before it"
        return (
            f"non-finite {what} at step {step} (epoch {epoch}, lr {lr:.3g}); the step was not applied; {good} "
            f"(--resume continues from it); the weights it diverged with are in {kept or self.ckpt_dir} (not a "
            "checkpoint). Try a lower optim.blr/lr, a longer warmup, optim.clip_grad, or run.amp=off."
        )

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """While training, SIGTERM and SIGINT only ask the loop to stop at the next step boundary."""
        self._signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def ask(signum: int, frame: Any) -> None:  # noqa: ARG001
            if self._signal:  # a second signal: stop now, the checkpoints on disk are complete
                raise KeyboardInterrupt
            self._signal = signum

        previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def fit(self, resume: str | Path | None = None) -> FitResult:
        """Train (``resume``: see the class docstring). The run folder is locked for the whole run (one run per
        folder: a second one stops with :class:`~mal.io.FolderInUseError` before it writes anything); an out of
        memory or a dead loader worker stops with :class:`ResourceError`, naming the last checkpoint."""
        self._lock_run()
        try:
            return self._fit(resume)
        except OUT_OF_MEMORY as e:
            raise ResourceError(self._resource_message("out of memory", e, OOM_HINT)) from e
        except RuntimeError as e:
            if "can't allocate memory" in str(e):  # the CPU allocator's out of memory
                raise ResourceError(self._resource_message("out of memory", e, OOM_HINT)) from e
            if not str(e).startswith("DataLoader worker"):
                raise
            raise ResourceError(self._resource_message("a data-loader worker died", e, WORKER_HINT)) from e
        finally:
            if self._lock is not None:
                self._lock.release()

    def _lock_run(self) -> None:
        """Take ``run.out_dir``'s lock (rank 0; every process learns whether it got it, in one broadcast)."""
        self._lock, error = None, None
        if self.world.is_main:
            try:
                self._lock = FolderLock(self.out_dir, what="run").acquire()
            except FolderInUseError as e:
                error = str(e)
        if self.world.distributed:
            shared = [error]
            torch.distributed.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error is not None:
            raise FolderInUseError(error)

    def _resource_message(self, what: str, err: BaseException, hint: str) -> str:
        last = latest_checkpoint(self.ckpt_dir)
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f"the last checkpoint is {last} (--resume continues from it)" if last else "no checkpoint was written"
        return f"{what} ({cause[:200]}); {hint}; {where}"

    def _fit(self, resume: str | Path | None) -> FitResult:
        run, optim, world = self.run, self.optim, self.world
        if run.threads:
            torch.set_num_threads(run.threads)
        if resume is None and latest_checkpoint(self.ckpt_dir) is not None:
            raise FileExistsError(
                f"{self.out_dir} already holds checkpoints: pass --resume to continue that run, or choose another "
                "run.out_dir"
            )
        self._check_writable()
        model = self.task.model.to(world.device)
        self.optimizer = build_optimizer(
            self.task.param_groups(optim.weight_decay, optim.layer_decay), self.base_lr, optim.betas
        )
        self._window = {"loss": 0.0, "steps": 0, "images": 0, "seconds": 0.0}
        step = self._resume(resume) if resume is not None else 0
        self._last_save = time.monotonic()
        if world.is_main:
            atomic_write(self.out_dir / "config.yaml", lambda f: f.write(self.config_yaml))
        wrapped: nn.Module = model
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [world.device.index] if world.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
        if run.compile == "blocks":  # in place, before the first forward; each encoder in the model compiles its own
            if not sum(m.compile_blocks() for m in model.modules() if hasattr(m, "compile_blocks")):
                raise ValueError("run.compile=blocks: the model has no encoder blocks; use run.compile=model")
        elif run.compile:
            wrapped = torch.compile(wrapped)
        logger = None
        if world.is_main:  # only rank 0 writes metrics
            logger = MetricLogger(self.out_dir, tensorboard=run.tensorboard, resume_step=step if resume else None)
        stop_at = min(self.total_steps, run.stop_after) if run.stop_after is not None else self.total_steps
        spe = self.sampler.steps_per_epoch
        loader = self._loader(self.train_set, batch_sampler=self.sampler)
        progress = None
        if world.is_main and run.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
        t_start = time.perf_counter()
        win = self._window
        last_loss: float | None = None
        last_ckpt: Path | None = None
        val: dict[str, float] = {}
        model.train()
        try:
            with self._signals():
                while step < stop_at:
                    epoch, in_epoch = divmod(step, spe)
                    self.sampler.set_epoch(epoch, in_epoch)
                    micro_batches = iter(loader)
                    while step < stop_at and in_epoch < spe:
                        t0 = time.perf_counter()
                        done = self._step(wrapped, micro_batches, step, epoch)
                        lr, loss_value, grad_norm, images = done.lr, done.loss, done.grad_norm, done.images
                        self.task.after_step(step)
                        step += 1
                        in_epoch += 1
                        last_loss = loss_value
                        win["loss"] += loss_value
                        win["steps"] += 1
                        win["images"] += images * world.size
                        win["seconds"] += time.perf_counter() - t0  # training steps only: evals and saves excluded
                        if progress is not None:
                            progress.update(1)
                        # the last window at the end of the schedule; a stop before it (run.stop_after, a signal)
                        # keeps its window in the checkpoint, and the resumed run logs it whole
                        if step % run.log_every == 0 or step == self.total_steps:
                            ips = win["images"] / max(win["seconds"], 1e-9)
                            loss_avg = win["loss"] / win["steps"]
                            if logger is not None:
                                metrics = {"loss": loss_avg, "lr": lr, "epoch": step / spe, "img_s": ips}
                                if grad_norm is not None:
                                    metrics["grad_norm"] = float(grad_norm)
                                logger.log(step, metrics)
                            if progress is not None:
                                progress.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                            win.update(loss=0.0, steps=0, images=0, seconds=0.0)
                        if run.eval_every and step % run.eval_every == 0 and step < stop_at:
                            val = self._evaluate(model, step, logger)
                        if run.image_every and step % run.image_every == 0 and step < stop_at:
                            self._images(model, step, logger)
                        signum, due = done.signal, done.due
                        periodic = run.ckpt_every and step % run.ckpt_every == 0
                        if step < stop_at and (periodic or signum or due):
                            last_ckpt = self._save(step, (epoch, in_epoch))
                        if signum and step < stop_at:
                            name = signal.Signals(signum).name
                            raise RunInterrupted(
                                f"stopped by {name} at step {step} of {self.total_steps}; checkpoint "
                                f"{last_ckpt or self.ckpt_dir}; continue with --resume",
                                signum,
                            )
                if self.bad.bad and world.is_main:
                    warnings.warn(
                        f"{self.bad.bad} of {self.bad.seen} images could not be read ({100 * self.bad.fraction:.2f}%, "
                        f"within data.max_bad_fraction={self.bad.max_fraction}); see the warnings for the files",
                        BadImageWarning, stacklevel=2,
                    )  # fmt: skip
                val = self._evaluate(model, step, logger)
                self._images(model, step, logger)
                last_ckpt = self._save(step, divmod(step, spe))
                if logger is not None:
                    logger.log_hparams(yaml.safe_load(self.config_yaml), {"train_loss": last_loss or 0.0, **val})
        finally:
            if progress is not None:
                progress.close()
            if logger is not None:
                logger.close()
        result = FitResult(
            step=step, finished=step >= self.total_steps, checkpoint=last_ckpt, train_loss=last_loss, val=val,
            seconds=time.perf_counter() - t_start,
        )  # fmt: skip
        if world.is_main:
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
            summary["code"] = code_version()  # which code trained it (a resumed run: the code that finished it)
            write_json(self.out_dir / "summary.json", summary)
        return result
