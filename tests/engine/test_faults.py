"""Fault injection: runs never lose work. Each section is one kind of fault (the numbered items of "what survives
what" in docs/PRETRAINING.md): a kill during a checkpoint write, retention, a NaN, a full disk or no permission,
corrupt checkpoints and metrics, SIGTERM / SIGINT, bad config values, file modes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, TINY, image_folder, tiny
from mal.cli import main as cli_main
from mal.config import ConfigError
from mal.engine import load_model_state, load_train_state, read_metrics
from mal.engine.checkpoint import (
    COMPLETE,
    CheckpointWriteError,
    CorruptCheckpointError,
    list_checkpoints,
    loadable_checkpoints,
    recover,
    save_checkpoint,
)
from mal.engine.loop import BadDataError, NonFiniteLossError
from mal.io import LOCK_NAME
from mal.pretrain.task import PretrainTask, pretrain


def small_state(value: float) -> tuple[dict[str, torch.Tensor], dict]:
    return {"w": torch.full((64, 64), value)}, {"step": int(value), "v": torch.full((8,), value)}


def assert_loads(ckpt: Path, value: float | None = None) -> None:
    w = load_model_state(ckpt)["w"]
    state = load_train_state(ckpt)
    assert state["v"].shape == (8,) and (value is None or float(w[0, 0]) == value == float(state["v"][0]))


# ------------------------------------------------------------------------------ 1. checkpoint writes, retention


def test_saving_a_step_again_replaces_it_only_after_its_successor_is_complete(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, 30, *small_state(1.0), "a: 1\n", keep=1)
    real_replace = os.replace

    def fail_into_place(src, dst):  # the new folder never reaches its place (a kill in the window)
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_into_place)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, 30, *small_state(2.0), "a: 1\n", keep=1)
    monkeypatch.setattr(os, "replace", real_replace)
    assert list_checkpoints(folder) == [folder / "step_00000030"]
    assert_loads(folder / "step_00000030", 1.0)  # the old one is back, whole


def test_recovery_completes_a_dead_save_and_never_deletes_complete_data(tmp_path):
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, 10, *small_state(1.0), "", keep=1)
    dead = 2**22 + 12345  # no such process
    # a save of step 20 killed after its files were complete, before the rename; and a replaced step 10 whose
    # successor never arrived
    (folder / "step_00000010").rename(folder / f".old-step_00000010-{dead}")
    save_checkpoint(tmp_path / "scratch", 20, *small_state(2.0), "")
    (tmp_path / "scratch" / "step_00000020").rename(folder / f".tmp-step_00000020-{dead}")
    (folder / f".tmp-step_00000030-{dead}").mkdir()  # and one killed half-way: no marker
    done = recover(folder)
    assert len(done) == 2 and list_checkpoints(folder) == [folder / "step_00000010", folder / "step_00000020"]
    assert_loads(folder / "step_00000020", 2.0)
    assert not any(p.name.startswith(".") for p in folder.iterdir() if p.name != LOCK_NAME)


def test_retention_keeps_the_newest_and_refuses_less_than_one(tmp_path):
    folder = tmp_path / "ckpt"
    for step in (1, 2, 3):
        save_checkpoint(folder, step, *small_state(float(step)), "", keep=2)
    assert [p.name for p in list_checkpoints(folder)] == ["step_00000002", "step_00000003"]
    save_checkpoint(folder, 3, *small_state(3.0), "", keep=1)  # the same step again: the older one goes
    assert [p.name for p in list_checkpoints(folder)] == ["step_00000003"]
    for keep in (0, -1):
        with pytest.raises(ValueError, match="keep must be >= 1"):
            save_checkpoint(folder, 4, *small_state(4.0), "", keep=keep)
        with pytest.raises(ConfigError, match="run.keep_ckpts"):
            tiny(tmp_path, f"run.keep_ckpts={keep}")
    assert list_checkpoints(folder) == [folder / "step_00000003"]


SAVER = """
import sys, torch
from mal.engine.checkpoint import save_checkpoint
folder = sys.argv[1]
for i in range(1000):
    step = 1 + i // 2  # every step is saved twice: the replace path is exercised as often as a new step
    save_checkpoint(folder, step, {"w": torch.full((256, 256), float(step))}, {"v": torch.full((8,), float(step))},
                    "x: 1\\n", keep=1)
"""


@pytest.mark.slow
def test_kill_9_at_random_points_of_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for trial in range(6):
        folder = tmp_path / f"ckpt{trial}"
        proc = subprocess.Popen([sys.executable, str(script), str(folder)], env=env)
        while not list_checkpoints(folder) and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        recover(folder)
        found = loadable_checkpoints(folder)
        assert found, f"trial {trial}: nothing left"
        newest = found[0]
        step = float(int(newest.name.split("_")[1]))
        assert_loads(newest, step)
        left = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
        assert not any(name.startswith(".") for name in left), left


# ------------------------------------------------------------------------------------------------------ 2. NaN


def test_a_nan_keeps_the_last_good_checkpoint_and_labels_the_diverged_weights(tmp_path, monkeypatch):
    common = ("optim.max_steps=40", "run.ckpt_every=30", "run.keep_ckpts=1", "data.val_split=null")
    pretrain(tiny(tmp_path, *common, "run.stop_after=30"))
    good = tmp_path / "run" / "checkpoints" / "step_00000030"
    before = load_model_state(good)
    explode_after, nan_at = 31, 32  # an exploding update (weights x 10), then the non-finite loss it causes
    real_after, real_step = PretrainTask.after_step, PretrainTask.training_step
    calls = {"step": 30}

    def after_step(self, step):
        real_after(self, step)
        calls["step"] = step + 1
        if step + 1 == explode_after:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(10.0)

    def training_step(self, model, batch):
        out = real_step(self, model, batch)
        return {"loss": out["loss"] * float("nan")} if calls["step"] == nan_at else out

    monkeypatch.setattr(PretrainTask, "after_step", after_step)
    monkeypatch.setattr(PretrainTask, "training_step", training_step)
    with pytest.raises(NonFiniteLossError, match=f"last good checkpoint is {good}"):
        pretrain(tiny(tmp_path, *common), resume="auto")
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == [good]  # not pruned, not replaced
    after = load_model_state(good)
    assert all(torch.equal(after[k], before[k]) for k in before)
    diverged = tmp_path / "run" / "checkpoints" / f"diverged_step_{nan_at:08d}"
    w = load_model_state(diverged)["encoder.patch_embed.proj.weight"]
    assert w.abs().max() > 5 * before["encoder.patch_embed.proj.weight"].abs().max()  # labelled, kept apart


# --------------------------------------------------------------------------------- 3. disk full, no permission


def test_a_full_disk_ends_with_one_line_and_the_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    args = ["pretrain", *TINY, "optim.max_steps=4", "run.ckpt_every=2", f"run.out_dir={tmp_path / 'r'}"]
    real_save = torch.save
    saves = {"n": 0}

    def full_disk(obj, f, *a, **k):  # what torch.save raises when the disk fills during a checkpoint
        saves["n"] += 1
        if saves["n"] == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3970")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    assert cli_main(args) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0] and "step_00000004" in err[0]
    ckpts = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000002"]
    load_train_state(ckpts[0])


class _Usage:
    def __init__(self, free: int) -> None:
        self.free, self.total, self.used = free, 10**12, 10**12 - free


def test_no_permission_or_no_room_is_noticed_before_training(tmp_path, monkeypatch, capsys):
    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".write-test"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    args = ["pretrain", *TINY, "optim.max_steps=4", f"run.out_dir={tmp_path / 'r'}"]
    assert cli_main(args) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write to" in err[0] and "Permission denied" in err[0]
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # no step ran
    monkeypatch.setattr(Path, "write_bytes", real)
    monkeypatch.setattr("shutil.disk_usage", lambda p: _Usage(1024))
    assert cli_main([*args[:-1], f"run.out_dir={tmp_path / 'r2'}"]) == 4
    assert "not enough space for a checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------- 4. corrupt checkpoints, metrics, resume


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, capsys):
    common = ("optim.max_steps=6", "run.ckpt_every=2", "run.keep_ckpts=3", "data.val_split=null")
    straight = pretrain(tiny(tmp_path, *common, name="straight"))
    pretrain(tiny(tmp_path, *common, "run.stop_after=4"))
    newest = tmp_path / "run" / "checkpoints" / "step_00000004"
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(UserWarning, match="step_00000004/model.safetensors is corrupt or truncated"):
        resumed = pretrain(tiny(tmp_path, *common), resume="auto")
    assert resumed.step == 6
    a, b = load_model_state(straight.checkpoint), load_model_state(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)  # from step 2, still bit-exact
    (newest.parent / "step_00000006" / "state.pt").write_bytes(b"not a pickle")
    with pytest.raises(CorruptCheckpointError, match="step_00000006/state.pt is corrupt"):
        load_train_state(newest.parent / "step_00000006")
    data = (newest / "model.safetensors").read_bytes()  # rewritten by the resumed run: truncate it again
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    ft = ["finetune", "--config", "configs/finetune/mal_micro_digits.yaml", f"init.checkpoint={newest}",
          "data.image_size=16", f"run.out_dir={tmp_path / 'ft'}"]  # fmt: skip
    assert cli_main(ft) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step_00000004/model.safetensors is corrupt or truncated" in err[0]
    assert cli_main(["eval", "--checkpoint", str(newest.parent / "step_00000006")]) == 2
    assert "is a pretraining checkpoint: fine-tune it first" in capsys.readouterr().err


def test_metrics_survive_a_partial_line_and_a_resumed_finished_run_logs_nothing_twice(tmp_path):
    common = ("optim.max_steps=6", "run.ckpt_every=3", "run.log_every=4")
    straight = tmp_path / "straight" / "metrics.jsonl"
    pretrain(tiny(tmp_path, *common, name="straight"))
    pretrain(tiny(tmp_path, *common, "run.stop_after=3"))
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 5, "split": "tra')  # a kill during a write
    with pytest.warns(UserWarning, match="partial last line"):
        pretrain(tiny(tmp_path, *common), resume="auto")
    pretrain(tiny(tmp_path, *common), resume="auto")  # the finished run again: nothing new
    rows = read_metrics(path)
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys))  # nothing logged twice
    assert {k for k in keys if k[1] == "val"} == {(3, "val"), (6, "val")}  # the stop's evaluation, then the end's
    # the train-loss window (4 steps) spans the interruption at step 3 and logs what the straight run logs
    loss = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}
    assert loss == {r["step"]: r["loss"] for r in read_metrics(straight, "train")} and set(loss) == {4, 6}


def test_too_many_bad_images_stop_with_a_checkpoint_and_one_line(tmp_path, capsys):
    root = image_folder(tmp_path / "data", n_good=14, n_bad=2)
    args = ["pretrain", *TINY, "data.name=imagefolder", f"data.root={root}", "optim.max_steps=4",
            "data.num_workers=0", "data.max_bad_fraction=0.0", f"run.out_dir={tmp_path / 'r'}"]  # fmt: skip
    with pytest.warns(UserWarning):
        assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not be read" in err[0] and "checkpoint" in err[0]
    ckpts = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000000"]
    with pytest.raises(BadDataError):
        pretrain(tiny(tmp_path, *args[1 + len(TINY) : -1], f"run.out_dir={tmp_path / 'r2'}"))


# --------------------------------------------------------------------------------------------- 5. signals


def _cli(tmp_path: Path, out: str, *extra: str, resume: bool = False) -> list[str]:
    over = [*TINY, "optim.max_steps=40", "run.ckpt_every=1000", "data.val_split=null", f"run.out_dir={tmp_path / out}"]
    return [sys.executable, "-m", "mal.cli", "pretrain", *over, *extra, *(["--resume"] if resume else [])]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_at_the_step_boundary_and_resume_is_bit_exact(tmp_path, sig):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    straight = subprocess.run(_cli(tmp_path, "straight"), env=env, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(_cli(tmp_path, "run"), env=env, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr
    line = stderr.strip().splitlines()[-1]
    assert f"stopped by {signal.Signals(sig).name} at step" in line and "--resume" in line
    assert "Traceback" not in stderr
    (ckpt,) = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert 0 < int(ckpt.name.split("_")[1]) < 40
    resumed = subprocess.run(_cli(tmp_path, "run", resume=True), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = load_model_state(tmp_path / "straight")
    b = load_model_state(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_time_interval_also_writes_checkpoints(tmp_path, monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(time, "monotonic", lambda: clock["t"])
    real_step = PretrainTask.training_step

    def training_step(self, model, batch):  # every step's forward "takes" 10 minutes
        clock["t"] += 600.0
        return real_step(self, model, batch)

    monkeypatch.setattr(PretrainTask, "training_step", training_step)
    pretrain(tiny(tmp_path, "optim.max_steps=7", "run.ckpt_every=1000", "run.ckpt_minutes=30", "run.keep_ckpts=null"))
    steps = [int(p.name.split("_")[1]) for p in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == [3, 6, 7]


# --------------------------------------------------------------------------------------------- 6. config values


@pytest.mark.parametrize(
    "override",
    ["optim.max_steps=0", "optim.max_steps=-5", "optim.blr=0", "optim.lr=0", "optim.epochs=0",
     "optim.warmup_epochs=-1", "optim.weight_decay=-0.1", "optim.clip_grad=0", "run.log_every=0",
     "run.keep_ckpts=0", "run.ckpt_every=0", "run.threads=-3", "run.ckpt_minutes=0", "data.image_size=-32",
     "data.num_workers=-1", "data.max_bad_fraction=1.5"],
)  # fmt: skip
def test_every_numeric_config_field_is_checked_at_load_time(tmp_path, capsys, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny(tmp_path, override)
    assert cli_main(["pretrain", *TINY, override, f"run.out_dir={tmp_path / 'r'}"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ 8. modes


def test_output_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        pretrain(tiny(tmp_path, "optim.max_steps=2", "run.image_every=2"))
    finally:
        os.umask(old)
    run = tmp_path / "run"
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    files = [run / "metrics.jsonl", run / "config.yaml", run / "summary.json", ckpt / "model.safetensors",
             ckpt / "config.json", ckpt / "state.pt", next((run / "images").glob("*.png"))]  # fmt: skip
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o644" for f in files}
    assert (ckpt / COMPLETE).is_file() and json.loads((ckpt / "config.json").read_text())["kind"] == "pretrainer"


def test_checkpoint_write_errors_name_the_cause(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "save", denied)
    with pytest.raises(CheckpointWriteError, match="permission denied"):
        save_checkpoint(tmp_path / "c", 1, *small_state(1.0), "")
    assert [p.name for p in (tmp_path / "c").iterdir()] == [LOCK_NAME]
