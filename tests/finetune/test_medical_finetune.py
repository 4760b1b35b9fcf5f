"""Medical segmentation end to end: U-Net fine-tuning on generated Synapse files and on the procedural volumes through
``mal.finetune.finetune``, the per-volume metrics of the evaluator, the shipped configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import SYNAPSE_SHAPE, synapse_folder
from mal.config import ConfigError
from mal.data import build_dataset
from mal.finetune import finetune, load_dense_model, load_finetune_config
from mal.pretrain.task import load_pretrain_config
from mal.tasks.dense import DenseEvaluator, DenseHeadSettings, evaluate_dense

pytest.importorskip("monai")

TINY = ["init.mode=scratch", "init.checkpoint=null", "model.name=mal_micro",
        "model.overrides={dim: 32, depth: 2, num_heads: 2}", "head.channels=16", "optim.max_steps=2",
        "optim.batch_size=4", "run.progress=false", "run.tensorboard=false", "run.image_every=null",
        "run.threads=1"]  # fmt: skip
VOLUME_KEYS = {"dsc", "hd95", "dsc_liver", "dsc_kidney", "dsc_spleen", "dsc_aorta", "hd95_aorta", "miou"}


def test_unet_finetunes_on_synapse_files_and_reports_volume_metrics(tmp_path):
    root = synapse_folder(tmp_path / "Synapse")
    out = tmp_path / "run"
    cfg = load_finetune_config(
        "configs/finetune/mal_base_synapse_unet.yaml",
        [*TINY, f"data.root={root}", "data.image_size=16", "data.load_size=[24, 20]", "run.eval_every=2",
         f"run.out_dir={out}"],
    )  # fmt: skip
    assert cfg.head.kind == "unet" and cfg.data.val_split == "test" and cfg.data.options["channels"] == 3
    result = finetune(cfg)
    assert result.finished
    organs = ("aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach")
    assert {"dsc", "hd95", *(f"dsc_{o}" for o in organs), *(f"hd95_{o}" for o in organs)} <= set(result.val)
    assert 0 <= result.val["dsc"] <= 100 and result.val["hd95"] >= 0
    model, saved = load_dense_model(out)
    assert saved.head.kind == "unet" and model.encoder.cfg.in_chans == 3
    test = build_dataset("synapse", "test", root=root, load_size=SYNAPSE_SHAPE, **saved.data.options)
    again = evaluate_dense(model, saved.task, saved.head, saved.data, test, batch_size=3)
    assert again["dsc"] == pytest.approx(result.val["dsc"]) and again["hd95"] == pytest.approx(result.val["hd95"])


def test_unet_finetunes_on_procedural_volumes_with_dice_ce(tmp_path):
    out = tmp_path / "vol"
    cfg = load_finetune_config(
        "configs/finetune/mal_micro_volumes_unet.yaml",
        [*TINY, "data.image_size=32", "data.load_size=32", "data.options={num_volumes: 2, num_slices: 6}",
         "run.eval_every=2", "run.log_every=1", f"run.out_dir={out}"],
    )  # fmt: skip
    assert cfg.head.seg_loss == "dice_ce" and not cfg.data.hflip
    result = finetune(cfg)
    assert set(result.val) >= VOLUME_KEYS and result.val["loss"] > 0
    model, saved = load_dense_model(out)
    test = build_dataset("volumes", "test", load_size=32, **saved.data.options)
    metrics = evaluate_dense(model, saved.task, saved.head, saved.data, test, batch_size=5)  # batches straddle
    assert set(metrics) >= VOLUME_KEYS and 0 <= metrics["dsc"] <= 100


class _OneHot(nn.Module):
    """A 'model' whose logits are its input: the evaluator's bookkeeping alone decides the metrics."""

    def forward(self, x):
        return {"out": x, "aux": None}


def _batches(pred: torch.Tensor, mask: torch.Tensor, volume: list[int], size: int):
    """Slices ``(N, H, W)`` -> evaluator batches of ``size`` with one-hot logits as images and volume tags."""
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    slices = [sum(1 for u in volume[:i] if u == v) for i, v in enumerate(volume)]
    for s in range(0, len(volume), size):
        yield {"images": logits[s : s + size], "mask": mask[s : s + size], "depth": None,
               "volume": torch.tensor(volume[s : s + size]), "slice": torch.tensor(slices[s : s + size]),
               "spacing": torch.tensor([[2.0, 1.0, 1.0]] * len(volume[s : s + size]), dtype=torch.float64)}  # fmt: skip


def test_evaluator_scores_each_volume_of_the_slices_it_is_given():
    """Two volumes of 4 slices in batches of 3: volume 0 predicted exactly, volume 1 with class 2 missed -> per
    class DSC (100 + 100) / 2 and (100 + 0) / 2, for the model and its 'ema_' copy."""
    mask = torch.zeros(8, 6, 6, dtype=torch.long)
    mask[:, 1:4, 1:4] = 1
    mask[:, 4:, 4:] = 2
    pred = mask.clone()
    pred[4:][pred[4:] == 2] = 0
    ev = DenseEvaluator("segmentation", DenseHeadSettings(kind="unet"), 3, classes=("background", "a", "b"))
    res = ev.run({"": _OneHot(), "ema_": _OneHot()}, _batches(pred, mask, [0] * 4 + [1] * 4, 3))
    assert res["dsc_a"] == 100.0 and res["dsc_b"] == 50.0 and res["dsc"] == 75.0
    assert res["hd95"] == 0.0 and res["ema_dsc"] == 75.0
    plain = ev.run({"": _OneHot()}, ({k: v for k, v in b.items() if k in ("images", "mask")} for b in
                                      _batches(pred, mask, [0] * 4 + [1] * 4, 3)))  # fmt: skip
    assert "dsc" not in plain and "miou" in plain  # slices without tags: no volumes


def test_shipped_medical_configs_load_and_say_what_they_train():
    base = load_finetune_config("configs/finetune/mal_base_synapse_unet.yaml")
    assert (base.data.name, base.data.image_size, base.head.kind) == ("synapse", 512, "unet")
    assert base.init.checkpoint == "runs/pretrain/mal_base_imagenet" and base.head.seg_loss == "dice_ce"
    pre = load_pretrain_config("configs/pretrain/mal_micro_volumes.yaml")
    assert pre.data.name == "volumes" and pre.model.name == "mal_micro"
    demo = load_finetune_config("configs/finetune/mal_micro_volumes_unet.yaml")
    assert demo.init.checkpoint == pre.run.out_dir


def test_dice_ce_is_refused_for_depth():
    with pytest.raises(ConfigError, match="dice_ce is a segmentation loss"):
        load_finetune_config("configs/finetune/mal_micro_volumes_unet.yaml", ["task=depth", "head.loss=dice_ce"])
