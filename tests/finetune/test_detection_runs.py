"""Detection fine-tuning end to end on generated COCO files: from a 1-step MAL pretraining checkpoint, 2 steps of
Mask R-CNN, resumed bit-exactly, evaluated by ``mal eval`` (COCO AP and a picture); the shipped COCO configs for 2
steps at toy size; the detection demo at a smoke-test budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY
from mal.cli import main as cli_main
from mal.data import ProceduralInstancesDataset, write_coco
from mal.engine import load_model_state, load_train_state
from mal.finetune import finetune, load_detector, load_finetune_config
from mal.pretrain.task import load_pretrain_config, pretrain
from mal.tasks.detection import Detector

pytestmark = pytest.mark.slow

# the demo's fine-tuning config at toy size: only sizes, steps and outputs change
SHRINK_DET = ["optim.max_steps=2", "optim.batch_size=4", "run.ckpt_every=1", "run.progress=false",
              "run.tensorboard=false", "run.threads=1", "detection.rpn_post_nms=20", "detection.detections=10",
              "data.num_workers=0"]  # fmt: skip


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    """The procedural instances as COCO files: 12 training and 6 validation images."""
    root = tmp_path_factory.mktemp("coco")
    write_coco(ProceduralInstancesDataset("train", num_samples=12), root, "train")
    write_coco(ProceduralInstancesDataset("test", num_samples=6), root, "val")
    return root


@pytest.fixture(scope="module")
def mal_checkpoint(tmp_path_factory) -> Path:
    """A 1-step MAL pretraining run of a tiny mal_micro at 64 px (4x4 clusters)."""
    out = tmp_path_factory.mktemp("pre") / "run"
    over = [
        *TINY,
        "data.name=scenes",
        "data.image_size=64",
        "data.load_size=64",
        "optim.max_steps=1",
        "model.overrides.layout.cluster_size=4",
        "data.val_split=null",
        "data.options={num_samples: 32}",
    ]
    assert pretrain(load_pretrain_config(None, [*over, f"run.out_dir={out}"])).finished
    return out


def test_detection_finetunes_from_a_mal_checkpoint_on_coco_files_resumes_and_evaluates(
    coco_root, mal_checkpoint, tmp_path, capsys
):
    common = ["--config", "mal_micro_instances_maskrcnn", f"init.checkpoint={mal_checkpoint}", "data.name=coco",
              f"data.root={coco_root}", "data.val_split=val", "data.label_fraction=1.0", *SHRINK_DET]  # fmt: skip
    straight = tmp_path / "straight"
    assert cli_main(["finetune", *common, f"run.out_dir={straight}"]) == 0
    out = capsys.readouterr().out
    assert "loaded" in out and "mask_rcnn, 4 classes" in out
    run = tmp_path / "run"
    assert cli_main(["finetune", *common, "run.stop_after=1", f"run.out_dir={run}"]) == 0
    assert cli_main(["finetune", "--resume", str(run), "run.stop_after=null"]) == 0  # its own config, in its folder
    a, b = load_model_state(straight), load_model_state(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-exact through a stop
    # the encoder started from the pretraining weights, the detector is saved and loads as itself
    model, cfg = load_detector(run)
    assert isinstance(model, Detector) and cfg.task == "detection" and model.classes[0] == "disc"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"][-1]
    assert {"ap_box", "ap_mask", "ap50_box", "apm_mask"} <= set(val)
    assert load_train_state(run)["step"] == 2
    # mal eval: COCO AP of boxes and masks on the files, and a picture
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(run), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["task"] == "detection" and metrics["images"] == 6 and 0 <= metrics["ap_box"] <= 100
    assert (tmp_path / "eval" / "predictions.png").stat().st_size > 1000
    assert "box AP" in capsys.readouterr().out


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_the_shipped_coco_configs_run_two_steps_at_toy_size(size, coco_root, tmp_path):
    pre = tmp_path / "pre"
    cfg = load_pretrain_config(f"mal_{size}_imagenet", [
        "model.overrides={dim: 32, depth: 2, num_heads: 2, patch_size: 4}", "objective.decoder_dim=16",
        "objective.decoder_depth=1", "objective.decoder_heads=2", "data.name=scenes", "data.root=null",
        "data.image_size=64", "data.load_size=64", "data.options={num_samples: 8}", "data.val_split=null",
        "optim.batch_size=4", "optim.max_steps=1", "data.num_workers=0", "run.progress=false",
        "run.tensorboard=false", "run.image_every=null", "run.eval_every=null", "data.randaugment=null",
        "data.max_bad_fraction=0.01", f"run.out_dir={pre}"])  # fmt: skip
    assert pretrain(cfg).finished
    toy = [f"init.checkpoint={pre}", f"data.root={coco_root}", "data.image_size=64", "detection.min_size=[48, 64]",
           "detection.max_size=96", "detection.anchor_sizes=[8, 16, 32, 64, 128]", "detection.fpn_channels=16",
           "detection.box_head_width=32", "detection.mask_head_width=16", "run.eval_every=null", "run.log_every=1",
           f"run.out_dir={tmp_path / 'ft'}", *SHRINK_DET]  # fmt: skip
    cfg = load_finetune_config(f"mal_{size}_coco_maskrcnn", toy)
    assert cfg.optim.layer_decay == 0.7 and cfg.detection.detector == "mask_rcnn" and cfg.data.name == "coco"
    result = finetune(cfg)
    assert result.finished and {"ap_box", "ap_mask"} <= set(result.val)


def test_quick_detection_demo_writes_coco_files_and_compares_three_initializations(tmp_path):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--task", "detection", "--out", str(out), "--quick", "--no-progress"]) == 0
    assert (out / "coco" / "annotations" / "instances_train2017.json").is_file()
    result = json.loads((out / "results.json").read_text())
    assert [r["pretraining"] for r in result["rows"]] == ["none", "MAE", "MAL"]
    for r in result["rows"]:
        assert 0 <= r["det.ap_box"] <= 100 and 0 <= r["det.ap_mask"] <= 100
    config = (out / "MAL" / "seed0" / "det" / "config.yaml").read_text()
    assert "name: coco" in config and str(out / "coco") in config  # fine-tuned from the files
    assert (out / "plot.png").stat().st_size > 1000
