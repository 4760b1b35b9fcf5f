"""Runs that are safe to share, to resume as people type it, and to feed real data: one run per folder, resume from
the run folder alone, DDP faults that end every process together, the bad-data recovery, one-line errors for every
bad input, and the smaller faults of checkpoints and model files. The fault table of docs/PRETRAINING.md has a row
for each."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT, TINY, image_folder, png16, tiny
from mal.cli import main as cli_main
from mal.data import ImageFolderDataset
from mal.engine import load_model_state, load_train_state, read_metrics
from mal.engine.checkpoint import COMPLETE, list_checkpoints, recover, save_checkpoint
from mal.engine.loop import StepSampler
from mal.io import LOCK_NAME, FolderInUseError, FolderLock
from mal.models import create_model, save_model
from mal.pretrain.task import PretrainTask, pretrain
from mal.runs import load_sweep_config, run_sweep

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
SHORT = ["optim.max_steps=6", "run.ckpt_every=2", "data.val_split=null"]


def mal(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``mal ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "mal.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, **kw)  # fmt: skip


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_model_state(a), load_model_state(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------------------------------- 1. one run per folder


def test_a_folder_lock_excludes_a_second_holder_and_names_the_first(tmp_path):
    first = FolderLock(tmp_path / "run", what="run").acquire()
    with pytest.raises(FolderInUseError, match=rf"in use by another run \(pid {os.getpid()} on "):
        FolderLock(tmp_path / "run", what="run").acquire()
    first.release()
    FolderLock(tmp_path / "run").acquire().release()  # free again; the lock file stays (one file, always)
    assert (tmp_path / "run" / LOCK_NAME).is_file()


HOLDER = """
import os, sys, time
from mal.io import FolderLock
FolderLock(sys.argv[1], what="run").acquire()
ready, started = os.pipe()
child = os.fork()  # as a data-loader worker is forked: it must not keep the lock alive after its parent died
if child == 0:
    os.write(started, b"1")  # the fork hooks have run by now: tell the parent (under load it may be killed first)
    time.sleep(120)
    os._exit(0)
os.read(ready, 1)
print(child, flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_taken_over_at_once_even_while_its_workers_live(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=ENV, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        with pytest.raises(FolderInUseError, match=f"pid {proc.pid}"):
            FolderLock(tmp_path).acquire()
        proc.kill()
        proc.wait()
        FolderLock(tmp_path).acquire().release()  # the forked child still runs, the lock is free
        os.kill(child, 0)
    finally:
        proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


@pytest.mark.slow
def test_a_second_run_on_a_busy_folder_exits_2_and_a_dead_runs_folder_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "optim.max_steps=100000", "run.ckpt_every=100000", "data.val_split=null",
            f"run.out_dir={out}"]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "mal.cli", *args], env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        while first.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        before = metrics.read_text()
        assert cli_main([*args, "optim.max_steps=3"]) == 2
        line = one_error_line(capsys)
        assert f"{out} is in use by another run (pid {first.pid} on {socket.gethostname()}" in line
        assert metrics.read_text().startswith(before)  # the second run wrote nothing
    finally:
        first.kill()
        first.wait()
    # kill -9 left no checkpoint: a fresh run starts there, taking the dead run's lock over
    assert cli_main([*args[:-3], "optim.max_steps=2", "data.val_split=null", f"run.out_dir={out}"]) == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002"]


def test_a_lock_file_naming_a_live_pid_does_not_hold_a_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # a reused pid
    assert pretrain(tiny(tmp_path, "optim.max_steps=1", "data.val_split=null")).finished


def test_a_sweep_folder_in_use_is_refused_before_anything_trains(tmp_path):
    cfg = load_sweep_config("demo", [f"out_dir={tmp_path / 'sweep'}", "seeds=[0]"])
    with FolderLock(tmp_path / "sweep", what="sweep"), pytest.raises(FolderInUseError, match="another sweep"):
        run_sweep(cfg, quick=True, progress=False)
    assert not list((tmp_path / "sweep").glob("*/seed0"))


# ----------------------------------------------------------------------------------- 2. resume as people type it


def test_resume_a_run_folder_alone_with_overrides_and_after_a_move(tmp_path, capsys, recwarn):
    straight = tmp_path / "straight"
    assert cli_main(["pretrain", *TINY, *SHORT, f"run.out_dir={straight}"]) == 0
    run = tmp_path / "a"
    assert cli_main(["pretrain", *TINY, *SHORT, "run.stop_after=2", f"run.out_dir={run}"]) == 0
    # --resume RUN alone: its config.yaml, in its folder; an override on top, named
    assert cli_main(["pretrain", "--resume", str(run), "run.stop_after=4"]) == 0
    out = capsys.readouterr().out
    assert "with changes to its config: run.stop_after" in out and f"{run}/checkpoints/step_00000004" in out
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    run.rename(moved)
    recwarn.clear()
    assert cli_main(["pretrain", "--resume", str(moved), "run.stop_after=null"]) == 0
    assert not [w for w in recwarn if "will differ" in str(w.message)]  # a moved run is the same run
    assert not run.exists() and list_checkpoints(moved / "checkpoints")[-1].name == "step_00000006"
    assert same_weights(straight, moved)  # bit-exact through a stop, an override of a free key and a move


def test_config_and_resume_continue_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "r"
    assert cli_main(["pretrain", *TINY, *SHORT, "run.stop_after=2", f"run.out_dir={run}"]) == 0
    # the shipped config's own out_dir would be runs/pretrain/...: the run continues where it is
    layout = "model.overrides.layout.cluster_size=2"  # the config's 4x4 clusters would be one at 16 px
    assert cli_main(["pretrain", "--config", "mal_micro_digits", "--resume", str(run), *TINY, *SHORT, layout]) == 0
    assert not (tmp_path / "runs").exists()
    assert load_train_state(run)["step"] == 6
    # a checkpoint folder names its run too
    assert cli_main(["pretrain", "--resume", str(run / "checkpoints" / "step_00000006")]) == 0


def test_a_moved_finetuning_run_finds_its_moved_pretraining(tmp_path, recwarn, capsys):
    src = tmp_path / "sweep"
    assert cli_main(["pretrain", *TINY, "optim.max_steps=2", "data.val_split=null", f"run.out_dir={src / 'pre'}"]) == 0
    ft = ["finetune", "--config", "mal_micro_digits", f"init.checkpoint={src / 'pre'}", "data.image_size=16",
          "data.load_size=16", "optim.max_steps=4", "optim.batch_size=16", "run.ckpt_every=2", "data.val_split=null",
          "run.progress=false", "run.tensorboard=false", "run.threads=1"]  # fmt: skip
    assert cli_main([*ft, "run.stop_after=2", f"run.out_dir={src / 'ft'}"]) == 0
    src.rename(tmp_path / "moved")
    recwarn.clear()
    assert cli_main(["finetune", "--resume", str(tmp_path / "moved" / "ft"), "run.stop_after=null"]) == 0
    assert f"init.checkpoint {src / 'pre'} is now {tmp_path / 'moved' / 'pre'}" in capsys.readouterr().out
    assert not [w for w in recwarn if "will differ" in str(w.message)]
    assert load_train_state(tmp_path / "moved" / "ft")["step"] == 4


def test_resuming_another_kind_of_run_or_another_model_is_one_line(tmp_path, capsys):
    pre = tmp_path / "pre"
    assert cli_main(["pretrain", *TINY, "optim.max_steps=2", "data.val_split=null", f"run.out_dir={pre}"]) == 0
    ft = tmp_path / "ft"
    assert cli_main(["finetune", "--config", "mal_micro_digits", f"init.checkpoint={pre}", "data.image_size=16",
                     "optim.max_steps=2", "optim.batch_size=16", "data.val_split=null", "run.progress=false",
                     "run.tensorboard=false", f"run.out_dir={ft}"]) == 0  # fmt: skip
    capsys.readouterr()
    assert cli_main(["pretrain", "--resume", str(ft)]) == 2
    assert "is a finetune run: continue it with mal finetune --resume" in one_error_line(capsys)
    assert cli_main(["finetune", "--resume", str(pre)]) == 2
    assert "is a pretrain run: continue it with mal pretrain --resume" in one_error_line(capsys)
    # the same through --config: the checkpoint's model kind is checked before any weight is loaded
    assert cli_main(["pretrain", *TINY, f"run.out_dir={ft}", "--resume"]) == 2
    assert "is a checkpoint of a classifier run, this run trains a pretrainer" in one_error_line(capsys)
    assert cli_main(["pretrain", "--resume", str(pre), "objective.decoder_dim=48"]) == 2
    line = one_error_line(capsys)
    assert "does not fit the model this config builds (the config differs in objective.decoder_dim)" in line
    assert cli_main(["pretrain", "--resume"]) == 2
    assert "--resume without a folder" in one_error_line(capsys)


# ------------------------------------------------------------------------- 3. DDP faults end every process together


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], timeout: float = 240) -> tuple[int, str]:
    """``mal ARGS`` in 2 gloo processes; a hang fails the test (the whole process group is killed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "mal.cli", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the 2-process run hung for {timeout}s:\n{out[-3000:]}")
    return proc.returncode, out


@pytest.mark.slow
def test_ddp_stops_every_process_together_on_an_unreadable_image(tmp_path):
    root = image_folder(tmp_path / "data", n_good=15, n_bad=1)  # one bad file per class: some rank reads one
    out = tmp_path / "run"
    code, log = torchrun(["pretrain", *TINY, "data.name=imagefolder", f"data.root={root}", "data.num_workers=0",
                          "data.max_bad_fraction=0.0", "optim.max_steps=4", "data.val_split=null",
                          f"run.out_dir={out}"])  # fmt: skip
    assert code != 0, log
    ranks = [ln for ln in log.splitlines() if "mal pretrain: error:" in ln]
    assert len(ranks) == 2 and all("could not be read" in ln and "--resume" in ln for ln in ranks), log[-3000:]
    assert len(list_checkpoints(out / "checkpoints")) == 1


@pytest.mark.slow
def test_ddp_trains_through_a_micro_batch_that_is_unreadable_as_a_whole(tmp_path):
    root = tmp_path / "data"
    image_folder(root, n_good=2, n_bad=6)  # per class: 2 good, 6 bad -> 16 train files, 12 bad
    common = [*TINY, "data.name=imagefolder", f"data.root={root}", "data.num_workers=0", "data.max_bad_fraction=1.0",
              "optim.max_steps=3", "optim.batch_size=8", "data.val_split=null"]  # fmt: skip
    # the seed's data order really gives a process a micro-batch of bad files only (the old code raised there)
    samples = ImageFolderDataset(root, "train").samples
    bad = {i for i, (path, _) in enumerate(samples) if Path(path).name.startswith("bad")}
    ranks = [StepSampler(len(samples), 8, world_size=2, rank=r, seed=0) for r in (0, 1)]
    assert any(set(micro) <= bad for sampler in ranks for micro in sampler)
    code, log = torchrun(["pretrain", *common, f"run.out_dir={tmp_path / 'run'}"])
    assert code == 0, log[-3000:]
    assert load_train_state(tmp_path / "run")["step"] == 3


# -------------------------------------------------------------------------------- 4. bad data, fix, resume works


def _good_png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path, format="PNG")


def test_the_documented_recovery_from_bad_data_works_end_to_end(tmp_path, capsys):
    root = image_folder(tmp_path / "data", n_good=14, n_bad=2)
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "data.name=imagefolder", f"data.root={root}", "data.num_workers=0",
            "data.max_bad_fraction=0.0", "optim.max_steps=4", "run.ckpt_every=2", "data.val_split=null",
            f"run.out_dir={out}"]  # fmt: skip
    with pytest.warns(UserWarning, match="could not read image"):
        assert cli_main(args) == 2
    line = one_error_line(capsys)
    assert "could not be read" in line and "fix or remove the files, then continue with --resume" in line
    (ckpt,) = list_checkpoints(out / "checkpoints")
    assert load_train_state(ckpt)["bad_samples"]["bad"] == 0  # the failing batch is redone, not counted
    assert cli_main(["pretrain", "--resume", str(out)]) == 2  # not fixed yet: it stops again, at the same step
    assert load_train_state(list_checkpoints(out / "checkpoints")[-1])["step"] == load_train_state(ckpt)["step"]
    for i, bad in enumerate(sorted((root / "train").glob("*/bad*.jpg"))):
        _good_png(bad, 100 + i)  # fixed: the same names, now readable
    capsys.readouterr()
    assert cli_main(["pretrain", "--resume", str(out)]) == 0
    final = load_train_state(out)
    assert final["step"] == 4 and final["bad_samples"] == {"good": 64, "bad": 0}


def test_one_bad_file_among_hundreds_does_not_stop_a_run_at_one_percent(tmp_path):
    root = image_folder(tmp_path / "data", n_good=150, n_bad=0)
    first = next(iter(StepSampler(300, 16, seed=0)))[0]  # the first image the run reads
    Path(ImageFolderDataset(root, "train").samples[first][0]).write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning, match=r"1 of 64 images could not be read \(1.56%, within"):
        result = pretrain(tiny(tmp_path, "data.name=imagefolder", f"data.root={root}", "data.num_workers=0",
                               "optim.max_steps=4", "data.val_split=null", "optim.batch_size=16"))  # fmt: skip
    assert result.finished and load_train_state(result.checkpoint)["bad_samples"] == {"good": 63, "bad": 1}


@pytest.mark.slow
def test_an_image_the_reader_cannot_represent_stops_the_run_in_one_line_from_a_loader_worker(tmp_path):
    root = image_folder(tmp_path / "data", n_good=15, n_bad=0)
    bad = png16(root / "train" / "a" / "colour16.png", np.full((20, 20, 3), 40000, dtype=np.uint16))
    proc = mal("pretrain", *TINY, "data.name=imagefolder", f"data.root={root}", "data.num_workers=1",
               "optim.max_steps=4", "data.val_split=null", f"run.out_dir={tmp_path / 'run'}")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert line.startswith("mal pretrain: error: cannot read ") and str(bad) in line and "16-bit" in line
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr


# ------------------------------------------------------------------------------ 6. one line and exit 2 for bad input


@pytest.mark.parametrize(
    "override",
    ["model.overrides.dim=-32", "model.overrides.dim=.inf", "model.overrides.num_heads=0", "data.options={foo: 1}",
     "optim.epochs=.inf", "optim.warmup_epochs=.inf", "optim.lr=.inf", "optim.weight_decay=.inf", "optim.blr=.nan",
     "run.out_dir=", "run.out_dir=' '"],
)  # fmt: skip
def test_bad_values_are_one_line_and_exit_2_before_anything_is_written(tmp_path, capsys, monkeypatch, override):
    monkeypatch.chdir(tmp_path)
    args = ["pretrain", *TINY, f"run.out_dir={tmp_path / 'r'}", override]
    assert cli_main(args) == 2
    key = override.split("=")[0].removeprefix("model.overrides.")
    assert key.split(".")[-1] in one_error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == []


def test_out_of_memory_is_one_line_with_a_hint(tmp_path, capsys, monkeypatch):
    def oom(self, model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(PretrainTask, "training_step", oom)
    assert cli_main(["pretrain", *TINY, "optim.max_steps=2", f"run.out_dir={tmp_path / 'r'}"]) == 2
    line = one_error_line(capsys)
    assert "out of memory (CUDA out of memory. Tried to allocate 20.00 GiB" in line and "optim.accum_steps" in line


KILLER = """
import os, signal, sys
import torch.utils.data as d
import mal.data.imagefolder as m
real, reads = m.ImageFolderDataset.__getitem__, [0]
def get(self, key):
    reads[0] += 1
    if d.get_worker_info() is not None and reads[0] == 40:  # in epoch 1, after the step-2 checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, key)
m.ImageFolderDataset.__getitem__ = get
from mal.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_loader_worker_is_one_line_with_a_hint_and_the_last_checkpoint(tmp_path):
    root = image_folder(tmp_path / "data", n_good=16, n_bad=0)  # 32 images, 4 steps of 8 an epoch
    args = ["pretrain", *TINY, "data.name=imagefolder", f"data.root={root}", "data.num_workers=1",
            "optim.max_steps=8", "run.ckpt_every=2", "optim.batch_size=8", "data.val_split=null",
            f"run.out_dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert "mal pretrain: error: a data-loader worker died" in line and "data.num_workers" in line, line
    assert f"the last checkpoint is {tmp_path / 'run' / 'checkpoints'}" in line and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- disk: file too large, metrics writes


def _fsize_limit(limit: int):  # noqa: ANN202
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_the_file_size_limit_is_told_apart_from_a_full_disk_and_names_the_file(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "optim.max_steps=2", "data.val_split=null", f"run.out_dir={out}"]
    proc = mal(*args, preexec_fn=_fsize_limit(64 * 1024))  # the weights are larger than 64 KiB
    assert proc.returncode == 4, proc.stderr
    line = last_line(proc.stderr)
    assert "file too large (the file-size limit, ulimit -f, is 64 KiB" in line and "model.safetensors" in line
    assert "no space left" not in line


def test_a_full_disk_during_a_metrics_write_leaves_no_partial_line_and_names_the_file(tmp_path, capsys, monkeypatch):
    from mal.engine import logging as mal_logging

    real_init = mal_logging.MetricLogger.__init__
    writes = {"n": 0}

    class FillingFile:
        def __init__(self, f) -> None:  # noqa: ANN001
            self.f = f

        def write(self, data: bytes) -> int:
            writes["n"] += 1
            if writes["n"] == 3:  # half a row makes it to disk, then the disk is full
                return self.f.write(data[: len(data) // 2])
            if writes["n"] == 4:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(self.f, name)

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self._file = FillingFile(self._file)

    monkeypatch.setattr(mal_logging.MetricLogger, "__init__", init)
    out = tmp_path / "run"
    assert cli_main(["pretrain", *TINY, "optim.max_steps=6", "run.ckpt_every=1", f"run.out_dir={out}"]) == 4
    line = one_error_line(capsys)
    assert "No space left on device" in line and str(out / "metrics.jsonl") in line
    rows = read_metrics(out / "metrics.jsonl")  # no partial last line: nothing to warn about
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "metrics.jsonl").read_text().endswith("\n")


# ----------------------------------------------------------------------------------------------- 7. smaller faults


LOAD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_DATA, (3 * 2**30, 3 * 2**30))  # the described model would need far more
import mal
try:
    mal.load_model(sys.argv[1])
except ValueError as e:
    print(e)
"""


@pytest.mark.slow
def test_load_model_checks_the_description_against_the_tensors_before_building(tmp_path):
    folder = save_model(create_model("mal_micro", num_classes=10), tmp_path / "m")
    card = json.loads((folder / "config.json").read_text())
    card["config"]["dim"] = 65536
    (folder / "config.json").write_text(json.dumps(card))
    proc = subprocess.run([sys.executable, "-c", LOAD, str(folder)], env=ENV, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "its description (config.json) does not match its tensors" in proc.stdout
    assert "k_proj.bias (131072,) in the description, (192,) in the file" in proc.stdout


def test_a_complete_save_left_by_a_dead_writer_whose_pid_is_reused_is_completed(tmp_path):
    folder = tmp_path / "ckpt"
    save_checkpoint(tmp_path / "scratch", 5, {"w": torch.ones(4)}, {"step": 5}, "")
    leftover = folder / f".tmp-step_00000005-{os.getpid()}"  # a pid that is alive: this very process
    folder.mkdir()
    (tmp_path / "scratch" / "step_00000005").rename(leftover)
    assert (leftover / COMPLETE).is_file()
    assert recover(folder) == [f"completed the save of {folder / 'step_00000005'}"]
    assert [p.name for p in list_checkpoints(folder)] == ["step_00000005"]


def test_retention_after_resuming_past_a_corrupt_checkpoint_keeps_the_good_ones(tmp_path):
    common = ("optim.max_steps=10", "run.ckpt_every=2", "run.keep_ckpts=2", "data.val_split=null")
    straight = pretrain(tiny(tmp_path, *common, name="straight"))
    pretrain(tiny(tmp_path, *common, "run.stop_after=6"))
    ckpts = tmp_path / "run" / "checkpoints"
    weights = ckpts / "step_00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match="kept as corrupt_step_00000006"):
        pretrain(tiny(tmp_path, *common, "run.stop_after=5"), resume="auto")
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000004", "step_00000005"]
    assert (ckpts / "corrupt_step_00000006" / "model.safetensors").is_file()  # kept for a look, not resumed from
    pretrain(tiny(tmp_path, *common), resume="auto")
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000008", "step_00000010"]
    assert same_weights(straight.checkpoint, ckpts / "step_00000010")


def test_eval_takes_a_saved_model_folder_with_the_data_named(tmp_path, capsys):
    import mal

    run = tmp_path / "ft"
    assert cli_main(["finetune", "--config", "mal_micro_digits", "init.mode=scratch", "init.checkpoint=null",
                     "model.name=mal_micro", "model.overrides.dim=32", "model.overrides.depth=1",
                     "model.overrides.num_heads=2", "data.image_size=16", "optim.max_steps=2", "optim.batch_size=16",
                     "data.val_split=null", "run.progress=false", "run.tensorboard=false",
                     f"run.out_dir={run}"]) == 0  # fmt: skip
    saved = mal.save_model(mal.load_model(run), tmp_path / "exported")
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(saved)]) == 2
    assert "pass the data to evaluate on (--data" in one_error_line(capsys)
    assert cli_main(["eval", "--checkpoint", str(saved), "--data", "digits", "--out", str(tmp_path / "e")]) == 0
    from_saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert cli_main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "e2")]) == 0
    from_run = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert from_saved["top1"] == from_run["top1"] and from_saved["images"] == from_run["images"]


def test_a_copied_run_does_not_share_its_lock_file(tmp_path):
    """A sweep copies finished runs with hard links; a lock file must never be shared between two runs (flock is
    per file), so copies leave lock files out."""
    from mal.runs import copy_run

    pretrain(tiny(tmp_path, "optim.max_steps=1", "data.val_split=null"))
    src = tmp_path / "run"
    assert (src / LOCK_NAME).is_file() and (src / "checkpoints" / LOCK_NAME).is_file()
    copy_run(src, tmp_path / "copy", tiny(tmp_path, "optim.max_steps=1", "data.val_split=null", name="copy"))
    assert not list((tmp_path / "copy").rglob(LOCK_NAME))
    with FolderLock(src, what="run"):
        FolderLock(tmp_path / "copy").acquire().release()
    shutil.rmtree(tmp_path / "copy")
