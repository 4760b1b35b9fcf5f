"""The shipped full-scale recipes run end to end at toy size: every ImageNet pretraining and fine-tuning config for 2
steps on a generated ImageFolder, and MAL-v1 stage 2 (NYU depth + ADE20K segmentation) from the stage-1 run, on files
in the real formats. Only the model's size, the batch, the steps and the outputs change; every recipe option (the
fine-tuning's RandAugment, erasing, mixup, EMA, layer decay, the new resolution) runs as shipped.
"""

from __future__ import annotations

import math

import pytest

from helpers import ade_folder, image_folder, nyu_file
from mal.engine import read_metrics
from mal.finetune import finetune, load_finetune_config
from mal.hub import load_model
from mal.pretrain.task import load_pretrain_config, pretrain

pytestmark = pytest.mark.slow

SIZES = ("tiny", "small", "base")
# the shipped recipe with a toy model and budget: only sizes, steps and outputs change
SHRINK = [
    "model.overrides={dim: 32, depth: 2, num_heads: 2, patch_size: 2}",  # 8x8 patches at 16 px: 2x2 clusters of 4x4
    "objective.decoder_dim=16",
    "objective.decoder_depth=1",
    "objective.decoder_heads=2",
    "data.image_size=16",
    "data.num_workers=0",
    "optim.batch_size=4",
    "optim.max_steps=2",
    "run.progress=false",
    "run.tensorboard=false",
    "run.image_every=null",
    "run.eval_every=null",
    "run.log_every=1",
    "run.threads=1",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "imagenet": image_folder(root / "imagenet", n_good=4, n_bad=0),
        "nyu": nyu_file(root / "nyu_depth_v2_labeled.mat"),
        "ade": ade_folder(root / "ADEChallengeData2016"),
    }


@pytest.mark.parametrize("size", SIZES)
def test_imagenet_stage1_then_nyu_ade_stage2_run_two_steps(size, files, tmp_path):
    stage1 = tmp_path / "stage1"
    data = [f"data.root={files['imagenet']}", "data.load_size=20"]
    cfg = load_pretrain_config(f"mal_{size}_imagenet", [*SHRINK, *data, f"run.out_dir={stage1}"])
    assert pretrain(cfg).finished
    stage2 = tmp_path / "stage2"
    cfg = load_pretrain_config(
        f"mal_{size}_multitask_nyu_ade",
        [*SHRINK, f"data.mixture.0.root={files['nyu']}", f"data.mixture.1.root={files['ade']}",
         "data.load_size=[24, 32]", "data.max_bad_fraction=0.5", f"init.checkpoint={stage1}", f"run.out_dir={stage2}"],
    )  # fmt: skip
    result = pretrain(cfg)
    assert result.finished
    rows = read_metrics(stage2 / "metrics.jsonl", "train")
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    # validation (NYU's test split + ADE20K's validation split, labels at their own resolution) has both tasks
    assert all(result.val[k] > 0 for k in ("ar_loss", "depth_loss", "seg_loss")), result.val


@pytest.mark.parametrize("size", SIZES)
def test_imagenet_finetune_runs_two_steps_at_a_new_resolution(size, files, tmp_path):
    stage1 = tmp_path / "stage1"
    data = [f"data.root={files['imagenet']}", "data.load_size=20"]
    pretrain(load_pretrain_config(f"mal_{size}_imagenet", [*SHRINK, *data, f"run.out_dir={stage1}"]))
    ft = tmp_path / "ft"
    # 16 px pretraining (8x8 patches, 2x2 clusters) -> 24 px fine-tuning (12x12 patches, still 2x2 clusters)
    over = [o for o in SHRINK if not o.startswith(("model.", "objective.", "data.image_size"))]
    cfg = load_finetune_config(
        f"mal_{size}_imagenet_ft",
        [*over, "data.image_size=24", f"data.root={files['imagenet']}", "data.load_size=27", "optim.batch_size=4",
         f"init.checkpoint={stage1}", f"run.out_dir={ft}"],
    )  # fmt: skip
    assert cfg.data.randaugment and cfg.data.erase_prob == 0.25 and cfg.recipe.ema_decay and cfg.optim.layer_decay < 1
    assert finetune(cfg).finished
    assert len(read_metrics(ft / "metrics.jsonl", "train")) == 2
    encoder = load_model(ft).encoder  # the saved classifier knows its resolution and kept the 2x2 cluster grid
    assert encoder.cfg.image_size == 24 and encoder.layout.row_spans == encoder.layout.col_spans == (6, 6)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_ade20k_upernet_configs_run_two_steps_with_sliding_window_evaluation(size, files, tmp_path):
    stage1 = tmp_path / "stage1"
    data = [f"data.root={files['imagenet']}", "data.load_size=20"]
    pretrain(load_pretrain_config(f"mal_{size}_imagenet", [*SHRINK, *data, f"run.out_dir={stage1}"]))
    ft = tmp_path / "ft"
    over = [o for o in SHRINK if not o.startswith(("model.", "objective.", "data.image_size", "run.eval_every"))]
    cfg = load_finetune_config(
        f"mal_{size}_ade20k_upernet",
        [*over, "data.image_size=16", f"data.root={files['ade']}", "data.load_size=[24, 32]", "head.channels=8",
         "data.max_bad_fraction=0.5", "optim.batch_size=3", "run.eval_every=2", f"init.checkpoint={stage1}",
         f"run.out_dir={ft}"],
    )  # fmt: skip
    assert cfg.head.kind == "upernet" and cfg.head.inference == "slide" and cfg.head.slide_stride == 341
    assert cfg.data.color_jitter == (0.5, 0.5, 0.5, 0.25) and cfg.optim.layer_decay == 0.65 and cfg.optim.lr == 5e-4
    result = finetune(cfg)
    assert result.finished and 0 <= result.val["miou"] <= 100 and 0 <= result.val["pixel_acc"] <= 100
    assert len(read_metrics(ft / "metrics.jsonl", "train")) == 2


def test_nyu_ade_stage2_names_the_missing_root(files, tmp_path):
    cfg = load_pretrain_config(
        "mal_tiny_multitask_nyu_ade", [*SHRINK, "init.checkpoint=null", f"run.out_dir={tmp_path}"]
    )
    with pytest.raises(ValueError, match=r"data.mixture.0 \(nyuv2\): .*needs data.mixture.0.root"):
        pretrain(cfg)
