"""The training engine through ``mal pretrain``: learning, exact resume, DDP, NaN stop, atomic checkpoints, bad files,
config validation, sampler and schedule."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import ROOT, TINY, image_folder, tiny
from mal.cli import main as cli_main
from mal.config import ConfigError, shipped_configs, to_dict
from mal.data import BadImageWarning
from mal.engine import (
    NonFiniteLossError,
    StepSampler,
    cosine_lr,
    latest_checkpoint,
    load_model_state,
    load_train_state,
    param_groups,
    read_metrics,
    save_checkpoint,
)
from mal.engine.loop import BadDataError
from mal.io import LOCK_NAME
from mal.pretrain.task import build_pretrainer, load_pretrain_config, pretrain


def final_state(result) -> dict[str, torch.Tensor]:
    return load_model_state(result.checkpoint)


def test_loss_goes_down_on_digits(tmp_path):
    cfg = tiny(tmp_path, "optim.max_steps=60", "run.eval_every=20", "data.crop_scale=[0.8, 1.0]", "data.hflip=false")
    result = pretrain(cfg)
    train = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "train")]
    val = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "val")]
    assert len(train) == 60 and len(val) == 3
    first, last = np.mean(train[:5]), np.mean(train[-5:])
    assert last < 0.75 * first, (first, last)
    assert val[-1] < val[0]
    assert result.finished and result.step == 60
    assert (tmp_path / "run" / "images" / "step_00000060.png").is_file()  # the final reconstruction grid
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "summary.json").is_file()


def test_resume_is_bit_exact(tmp_path):
    # random crops, flips, random cluster order and gradient accumulation all draw from RNGs that must be restored
    common = (
        "optim.max_steps=10", "optim.accum_steps=2", "optim.warmup_epochs=0.1", "run.ckpt_every=3",
        "model.overrides={dim: 32, depth: 1, num_heads: 2, layout: {cluster_order: random}}",
        "data.name=digits", "optim.batch_size=128",  # 1257 // 128 = 9 steps per epoch: the run crosses an epoch
    )  # fmt: skip
    straight = pretrain(tiny(tmp_path, *common, name="a"))
    stopped = pretrain(tiny(tmp_path, *common, "run.stop_after=5", name="b"))
    assert stopped.step == 5 and not stopped.finished
    resumed = pretrain(tiny(tmp_path, *common, name="b"), resume="auto")
    assert resumed.step == 10 and resumed.finished
    a, b = final_state(straight), final_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the optimizer state too, and the metrics file holds one history
    sa, sb = load_train_state(straight.checkpoint), load_train_state(resumed.checkpoint)
    for key, va in sa["optimizer"]["state"].items():
        assert torch.equal(va["exp_avg_sq"], sb["optimizer"]["state"][key]["exp_avg_sq"])
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl", "train")]
    assert steps == list(range(1, 11))


def test_loader_crops_do_not_depend_on_resume_or_worker_processes(tmp_path):
    # crops from the full image and RandAugment in the loader (seeded per sample), flips and erasing on the batch
    root = image_folder(tmp_path / "data", n_good=16, n_bad=0)
    common = (
        "optim.max_steps=4", "optim.batch_size=8", "run.ckpt_every=2", "data.name=imagefolder", f"data.root={root}",
        "data.randaugment=rand-m9-mstd0.5", "data.erase_prob=0.5", "data.eval_crop=0.875",
    )  # fmt: skip
    straight = pretrain(tiny(tmp_path, *common, "data.num_workers=2", name="a"))
    pretrain(tiny(tmp_path, *common, "data.num_workers=0", "run.stop_after=2", name="b"))
    resumed = pretrain(tiny(tmp_path, *common, "data.num_workers=0", name="b"), resume="auto")
    a, b = final_state(straight), final_state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fresh_run_refuses_an_out_dir_with_checkpoints(tmp_path):
    pretrain(tiny(tmp_path, "optim.max_steps=1"))
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(tiny(tmp_path, "optim.max_steps=1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_and_ddp(tmp_path: Path, common: list[str]) -> tuple[dict, dict]:
    """The final weights of ``mal pretrain *common`` in this process and in a 2-process ``torchrun``."""
    single = pretrain(load_pretrain_config(None, [*common, f"run.out_dir={tmp_path / 'single'}"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
        "-m", "mal.cli", "pretrain", *common, f"run.out_dir={tmp_path / 'ddp'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert load_train_state(tmp_path / "ddp")["step"] == load_train_state(single.checkpoint)["step"]
    return final_state(single), load_model_state(tmp_path / "ddp")


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    # deterministic augmentation, so that the two processes see exactly the single process's global batch
    common = [
        *TINY, "optim.max_steps=3", "optim.batch_size=16", "data.crop_scale=[1.0, 1.0]", "data.crop_ratio=[1.0, 1.0]",
        "data.hflip=false", "data.val_split=null",
    ]  # fmt: skip
    a, b = single_and_ddp(tmp_path, common)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(a[k], v) for k, v in load_model_state_init(tmp_path).items())


@pytest.mark.slow
def test_two_process_ddp_gets_the_same_loader_crops_as_one_process(tmp_path):
    # random crops from the full image are seeded per sample, so 2 processes see the single process's crops
    root = image_folder(tmp_path / "data", n_good=16, n_bad=0)
    common = [
        *TINY, "optim.max_steps=3", "optim.batch_size=16", "data.name=imagefolder", f"data.root={root}",
        "data.num_workers=1", "data.crop_scale=[0.1, 1.0]", "data.hflip=false", "data.val_split=null",
    ]  # fmt: skip
    a, b = single_and_ddp(tmp_path, common)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def load_model_state_init(tmp_path: Path) -> dict[str, torch.Tensor]:
    """The initial parameters (seeded build), to check the runs above really trained."""
    cfg = load_pretrain_config(None, [*TINY, f"run.out_dir={tmp_path / 'x'}"])
    torch.manual_seed(cfg.run.seed)
    return build_pretrainer(cfg, 1).state_dict()


def test_nan_loss_stops_with_a_message_and_a_loadable_checkpoint(tmp_path, monkeypatch):
    from mal.pretrain.objective import MALPretrainer

    calls = {"n": 0}
    original = MALPretrainer.forward_loss

    def poisoned(self, pred, target, weight):
        calls["n"] += 1
        loss = original(self, pred, target, weight)
        return loss * float("nan") if calls["n"] == 4 else loss  # the 4th training forward (step 3)

    monkeypatch.setattr(MALPretrainer, "forward_loss", poisoned)
    cfg = tiny(tmp_path, "optim.max_steps=10", "run.eval_every=null", "data.val_split=null", "run.ckpt_every=2")
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss nan at step 3.*last good checkpoint is .*step_00000002"
    ):
        pretrain(cfg)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_00000002"
    # the weights it stopped with are kept apart, labelled: here the step was never applied, so they are good
    state = load_model_state(tmp_path / "run" / "checkpoints" / "diverged_step_00000003")
    assert all(torch.isfinite(v).all() for v in state.values())
    model = build_pretrainer(cfg, 1)
    model.load_state_dict(state, strict=True)
    # it is the state after 3 good steps: the same as a clean run stopped there
    monkeypatch.setattr(MALPretrainer, "forward_loss", original)
    clean = pretrain(tiny(tmp_path, "optim.max_steps=10", "run.stop_after=3", "data.val_split=null", name="clean"))
    for k, v in final_state(clean).items():
        assert torch.equal(v, state[k]), k


def test_cli_reports_nan_with_exit_code(tmp_path, capsys):
    code = cli_main(["pretrain", *TINY, "optim.max_steps=3", "optim.lr=1e30", f"run.out_dir={tmp_path / 'r'}"])
    assert code == 3
    assert "non-finite" in capsys.readouterr().err


def test_checkpoint_is_never_half_written(tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    good = save_checkpoint(folder, 1, {"w": torch.ones(2)}, {"step": 1}, "a: 1\n")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(folder, 2, {"w": torch.zeros(2)}, {"step": 2}, "a: 1\n")
    assert latest_checkpoint(folder) == good
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, "step_00000001"]  # no partial step_2, no temp
    (folder / ".tmp-step_00000003-1").mkdir()  # a crash that killed the process mid-write
    assert latest_checkpoint(folder) == good
    torch.testing.assert_close(load_model_state(folder)["w"], torch.ones(2))


def test_corrupt_images_are_counted_and_skipped(tmp_path):
    root = image_folder(tmp_path / "data", n_good=14, n_bad=2)
    # in the training process: a loader worker's warnings do not reach pytest.warns
    over = ["data.name=imagefolder", f"data.root={root}", "optim.epochs=1", "data.max_bad_fraction=0.2",
            "data.num_workers=0"]  # fmt: skip
    with pytest.warns(BadImageWarning):
        result = pretrain(tiny(tmp_path, *over))
    assert result.finished
    bad = load_train_state(result.checkpoint)["bad_samples"]
    # one epoch = 2 steps of 16 of the 32 files, 4 of them unreadable
    assert bad == {"good": 28, "bad": 4}
    with pytest.raises(BadDataError, match="could not be read"), pytest.warns(UserWarning):
        pretrain(tiny(tmp_path, *over, "data.max_bad_fraction=0.0", name="strict"))


def test_unknown_or_mistyped_config_keys_are_rejected(tmp_path, capsys):
    with pytest.raises(ConfigError, match="optim.bogus: unknown key"):
        tiny(tmp_path, "optim.bogus=1")
    with pytest.raises(ConfigError, match="optim.batch_size"):
        tiny(tmp_path, "optim.batch_size=lots")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: mal_micro\nobjectiv:\n  decoder_dim: 64\n")
    with pytest.raises(ConfigError, match="did you mean 'objective'"):
        load_pretrain_config(bad)
    assert cli_main(["pretrain", "--config", str(bad)]) == 2
    assert "objectiv" in capsys.readouterr().err


SHIPPED = list(shipped_configs("pretrain").values())  # _*.yaml are bases, not configs


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_validate_and_build(path):
    cfg = load_pretrain_config(path)
    with torch.device("meta"):
        model = build_pretrainer(cfg, 1 if cfg.data.name == "digits" else 3)
    assert model.encoder.cfg.image_size == cfg.data.image_size
    if cfg.data.name == "imagefolder":  # the paper's recipe (docs/DESIGN.md, 'Pretraining optimiser and recipe')
        assert cfg.data.image_size == 192 and model.encoder.cfg.layout.cluster_size == 4
        assert model.encoder.cfg.layout.scan_schedule == "alternating"
        assert cfg.optim.blr == 1.5e-4 and cfg.optim.betas == (0.9, 0.95) and cfg.optim.warmup_epochs == 5
    if cfg.data.name == "mixture":  # MAL-v1 stage 2: depth from NYU, segmentation from ADE20K, both losses at 1.0
        parts = [(p.name, p.tasks) for p in cfg.data.mixture]
        assert parts == [("nyuv2", ("depth",)), ("ade20k", ("segmentation",))]
        assert cfg.multitask.depth_weight == cfg.multitask.seg_weight == 1.0
        assert cfg.init.checkpoint == f"runs/pretrain/{cfg.model.name}_imagenet"  # the stage-1 config's out_dir


def test_step_sampler_shards_whole_global_batches():
    full = StepSampler(100, 12, seed=3)
    assert full.steps_per_epoch == 8
    single = list(full)
    shards = [list(StepSampler(100, 12, world_size=2, rank=r, accum_steps=3, seed=3)) for r in range(2)]
    for step in range(8):
        parts = [i for r in range(2) for i in sum(shards[r][3 * step : 3 * step + 3], [])]
        assert sorted(parts) == sorted(single[step])
        assert all(len(m) == 2 for r in range(2) for m in shards[r][3 * step : 3 * step + 3])
    mid = StepSampler(100, 12, seed=3)
    mid.set_epoch(0, start_step=5)
    assert list(mid) == single[5:] and len(mid) == 3
    mid.set_epoch(1)
    assert list(mid) != single  # a new permutation every epoch
    with pytest.raises(ValueError, match="divisible"):
        StepSampler(100, 12, world_size=5)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(10, 12)


def test_step_sampler_seeds_samples_by_index_whatever_the_processes():
    single = StepSampler(100, 12, seed=3, sample_seeds=True)
    keys = list(single)
    assert [[i for i, _ in m] for m in keys] == list(StepSampler(100, 12, seed=3))  # the same order, with seeds
    seeds = {i: s for m in keys for i, s in m}
    assert len(set(seeds.values())) == len(seeds)  # one seed per sample
    shards = [StepSampler(100, 12, world_size=2, rank=r, accum_steps=3, seed=3, sample_seeds=True) for r in range(2)]
    assert all(seeds[i] == s for shard in shards for m in shard for i, s in m)  # rank and accumulation: no change
    mid = StepSampler(100, 12, seed=3, sample_seeds=True)
    mid.set_epoch(0, start_step=5)
    assert list(mid) == keys[5:]  # a resumed epoch draws the same crops
    mid.set_epoch(1)
    assert all(s != seeds.get(i) for m in mid for i, s in m)  # new crops every epoch


def test_cosine_schedule_values():
    kw = dict(base_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert cosine_lr(0, **kw) == 0.0
    assert cosine_lr(5, **kw) == pytest.approx(0.5)
    assert cosine_lr(10, **kw) == pytest.approx(1.0)
    assert cosine_lr(60, **kw) == pytest.approx(0.55)
    assert cosine_lr(110, **kw) == pytest.approx(0.1)
    assert cosine_lr(500, **kw) == pytest.approx(0.1)


def test_param_groups_exclude_norms_biases_and_embeddings(tmp_path):
    model = build_pretrainer(tiny(tmp_path), 1)
    groups = param_groups(model, 0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    free = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "encoder.pos_embed.embed" in free or any("pos_embed" in n for n in free)
    assert "decoder.query_token" in free
    assert all(model.get_parameter(n).ndim > 1 for n in decayed)
    assert all(model.get_parameter(n).ndim == 1 or "embed" in n or "token" in n for n in free)
    assert decayed | free == {n for n, _ in model.named_parameters()}


def test_resume_with_a_changed_config_warns_and_names_the_keys(tmp_path, recwarn):
    pretrain(tiny(tmp_path, "optim.max_steps=4", "run.stop_after=2", "data.val_split=null"))
    with pytest.warns(UserWarning, match=r"different config \(optim\.blr\)"):
        pretrain(tiny(tmp_path, "optim.max_steps=4", "optim.blr=1e-3", "data.val_split=null"), resume="auto")
    # run.stop_after may change freely (that is how a stopped run is continued): no warning
    pretrain(tiny(tmp_path, "optim.max_steps=4", "run.stop_after=3", "data.val_split=null", name="b"))
    recwarn.clear()
    pretrain(tiny(tmp_path, "optim.max_steps=4", "data.val_split=null", name="b"), resume="auto")
    assert not [w for w in recwarn if "different config" in str(w.message)]


def test_a_key_added_to_the_code_after_a_run_is_no_change_at_its_default(tmp_path):
    """Runs saved before a config key existed stay reusable while the key keeps its default."""
    from mal.config import config_changes
    from mal.pretrain.task import load_pretrain_config

    cfg = load_pretrain_config("configs/pretrain/mal_micro_digits.yaml", [])
    saved = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))
    del saved["objective"]["method"], saved["objective"]["mask_ratio"]  # as written before MAE existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_changes(tmp_path / "config.yaml", cfg) == []
    mae = load_pretrain_config("configs/pretrain/mal_micro_digits.yaml", ["objective.method=mae"])
    assert config_changes(tmp_path / "config.yaml", mae) == ["objective.method"]
    other = load_pretrain_config("configs/pretrain/mal_micro_digits.yaml", ["optim.blr=1e-3"])
    assert config_changes(tmp_path / "config.yaml", other) == ["optim.blr"]


def test_models_are_compared_as_built(tmp_path):
    """An override equal to the preset's value is the same model; another value is a change named by its key."""
    from mal.config import config_changes
    from mal.models.registry import expand_model_section
    from mal.pretrain.task import load_pretrain_config

    base = load_pretrain_config("configs/pretrain/mal_micro_digits.yaml", ["model.overrides={}"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(base)))
    same = load_pretrain_config(
        "configs/pretrain/mal_micro_digits.yaml", ["model.overrides={layout: {cluster_size: 2}}"]
    )
    assert config_changes(tmp_path / "config.yaml", same, expand=expand_model_section) == []  # the preset's 2x2
    other = load_pretrain_config(
        "configs/pretrain/mal_micro_digits.yaml", ["model.overrides={layout: {cluster_size: 4}}"]
    )
    assert config_changes(tmp_path / "config.yaml", other, expand=expand_model_section) == [
        "model.overrides.layout.cluster_size"
    ]
    vit = load_pretrain_config("configs/pretrain/mal_micro_digits.yaml", ["model.name=vit_micro"])
    assert "model.name" in config_changes(tmp_path / "config.yaml", vit, expand=expand_model_section)


def test_retain_freed_memory_is_idempotent_and_can_be_turned_off(monkeypatch):
    import platform
    import sys

    import mal.runtime as rt

    monkeypatch.setattr(rt, "_applied", None)
    monkeypatch.setenv("MAL_RETAIN_FREED_MEMORY", "0")
    assert rt.retain_freed_memory() is False
    monkeypatch.setattr(rt, "_applied", None)
    monkeypatch.delenv("MAL_RETAIN_FREED_MEMORY")
    first = rt.retain_freed_memory()
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert first is glibc  # mallopt accepted both settings where it exists
    assert rt.retain_freed_memory() is first


def test_tensorboard_gets_scalars_reconstructions_and_hyperparameters(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(tiny(tmp_path, "optim.max_steps=2", "run.image_every=2", "run.tensorboard=true", "run.eval_every=1"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert "train/loss" in tags["scalars"] and "val/loss" in tags["scalars"]
    assert "images" in tags["images"] and "hparam/loss" in tags["scalars"]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
