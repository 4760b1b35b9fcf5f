"""Multi-task pretraining (stage 2) and dense fine-tuning: losses by hand, the stage-2 objective, checkpoint
hand-over stage 1 -> stage 2 -> fine-tuning, sliding-window inference, the CLI for dense runs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mal.cli import main as cli_main
from mal.config import ConfigError
from mal.data import build_dataset
from mal.engine import read_metrics
from mal.finetune import DenseTask, load_dense_model, load_finetune_config
from mal.models import create_encoder
from mal.pretrain.multitask import MultiTaskPretrainer, MultiTaskSettings
from mal.pretrain.objective import ObjectiveConfig
from mal.pretrain.task import load_pretrain_config, pretrain
from mal.tasks.dense import DenseHeadSettings, DensePredictor, predict, slide_windows
from mal.tasks.depth import depth_loss
from mal.tasks.segmentation import seg_loss

TINY = ["model.name=mal_micro", "model.overrides={dim: 32, depth: 2, num_heads: 2}", "data.image_size=16",
        "data.load_size=16"]  # fmt: skip
TINY_DEC = ["objective.decoder_dim=16", "objective.decoder_depth=1", "objective.decoder_heads=2"]
RUN = ["run.progress=false", "run.tensorboard=false", "run.eval_every=null", "run.image_every=null"]


def tiny_encoder():
    return create_encoder("mal_micro", image_size=16, dim=32, depth=2, num_heads=2, in_chans=3)


# ------------------------------------------------------------------------------------------------------- losses


def test_depth_loss_by_hand_per_sample_then_over_labelled_samples():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    depth = torch.tensor([[[2.0, 2.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[4.0, 0.0], [0.0, 0.0]]])
    # sample 0: errors 1, 0, (masked), 9 -> 10/3; sample 1: no depth -> left out; sample 2: 1 -> 1
    assert depth_loss(pred, depth).item() == pytest.approx((10 / 3 + 1) / 2)
    log = depth_loss(torch.zeros(1, 1, 1, 2), torch.tensor([[[1.0, torch.e]]]), log=True)
    assert log.item() == pytest.approx(0.5)  # (0 - 0)^2 and (0 - 1)^2
    none = depth_loss(pred.requires_grad_(), torch.zeros(3, 2, 2))
    assert none.item() == 0.0 and none.requires_grad  # keeps a graph: DDP sees every parameter used


def test_seg_loss_by_hand_ignores_255_and_unlabelled_samples():
    logits = torch.zeros(2, 3, 1, 2)
    logits[0, 1, 0, 0] = 2.0
    mask = torch.tensor([[[1, 255]], [[255, 255]]])
    expected = -torch.log_softmax(torch.tensor([0.0, 2.0, 0.0]), 0)[1]  # one labelled pixel in one sample
    assert seg_loss(logits, mask).item() == pytest.approx(expected.item())
    assert seg_loss(logits, torch.full((2, 1, 2), 255)).item() == 0.0


# ------------------------------------------------------------------------------------------- stage-2 objective


def test_multitask_loss_is_the_weighted_sum_and_unlabelled_batches_add_nothing():
    torch.manual_seed(0)
    tasks = MultiTaskSettings(depth_weight=0.5, seg_weight=2.0)
    cfg = ObjectiveConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2)
    model = MultiTaskPretrainer(tiny_encoder(), cfg, tasks=tasks, num_classes=4)
    images = torch.randn(2, 3, 16, 16)
    depth = torch.rand(2, 16, 16) * 5 + 1
    mask = torch.randint(0, 4, (2, 16, 16))
    out = model(images, depth, mask)
    assert out["depth_loss"] > 0 and out["seg_loss"] > 0
    total = out["ar_loss"] + 0.5 * out["depth_loss"] + 2.0 * out["seg_loss"]
    torch.testing.assert_close(out["loss"].detach(), total)
    out["loss"].backward()
    for name in ("depth_head", "seg_head", "decoder", "encoder"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    # no labels: only the autoregressive loss is left (and it is the plain MALPretrainer's)
    plain = model(images, torch.zeros(2, 16, 16), torch.full((2, 16, 16), 255))
    torch.testing.assert_close(plain["loss"], plain["ar_loss"])
    torch.testing.assert_close(plain["ar_loss"], out["ar_loss"])


def test_dense_heads_see_the_whole_image_in_finetune_mode():
    """The dense pass is bidirectional: a pixel change in the last cluster moves predictions in the first one
    (the autoregressive pass of the same weights must not, which test_pretrain checks)."""
    torch.manual_seed(0)
    model = MultiTaskPretrainer(
        tiny_encoder(), ObjectiveConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2),
        tasks=MultiTaskSettings(depth_weight=1.0), num_classes=0,
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 16, 16)
    y = x.clone()
    y[..., -4:, -4:] += 1.0
    a, b = model.forward_dense(x)["depth"], model.forward_dense(y)["depth"]
    assert (a[..., :4, :4] - b[..., :4, :4]).abs().max() > 1e-6


def test_stage2_loss_decreases_on_procedural_scenes_and_hands_over_to_finetuning(tmp_path):
    stage1 = tmp_path / "stage1"
    cfg1 = load_pretrain_config(
        "configs/pretrain/mal_micro_scenes.yaml",
        [*TINY, *TINY_DEC, *RUN, "optim.max_steps=2", "optim.batch_size=16", f"run.out_dir={stage1}"],
    )
    pretrain(cfg1)
    stage2 = tmp_path / "stage2"
    cfg2 = load_pretrain_config(
        "configs/pretrain/mal_micro_multitask.yaml",
        [*TINY, *TINY_DEC, *RUN, "optim.max_steps=40", "optim.batch_size=16", "optim.blr=3e-2",
         "optim.warmup_epochs=0.05", "run.log_every=1", f"init.checkpoint={stage1}", f"run.out_dir={stage2}"],
    )  # fmt: skip
    result = pretrain(cfg2)
    assert result.finished and {"ar_loss", "depth_loss", "seg_loss"} <= set(result.val)
    losses = [r["loss"] for r in read_metrics(stage2 / "metrics.jsonl", "train")]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # measured 0.72 (AR 1.0, depth 6.3, seg 1.1 at the end)

    # fine-tuning takes the encoder and drops decoder and dense pretraining heads, reporting them
    ft = tmp_path / "seg"
    cfg = load_finetune_config(
        "configs/finetune/mal_micro_scenes_seg.yaml",
        [*TINY, *RUN, "head.channels=8", "optim.max_steps=2", "optim.batch_size=8", f"init.checkpoint={stage2}",
         f"run.out_dir={ft}"],
    )  # fmt: skip
    task = DenseTask(cfg, build_dataset("scenes", "train", load_size=16), verbose=False)
    n_enc = sum(1 for k in task.model.state_dict() if k.startswith("encoder."))
    assert task.load_report["loaded"] == n_enc
    assert task.load_report["dropped"] > 0


def test_stage2_rejects_a_dataset_without_the_labels(tmp_path):
    cfg = load_pretrain_config(
        "configs/pretrain/mal_micro_multitask.yaml",
        [*TINY, *TINY_DEC, *RUN, "data.name=digits", "data.load_size=null", "init.checkpoint=null",
         f"run.out_dir={tmp_path}"],
    )  # fmt: skip
    with pytest.raises(ValueError, match="no depth labels"):
        pretrain(cfg)


# ------------------------------------------------------------------------------------------- dense fine-tuning


class _Echo(nn.Module):
    """A 'model' whose output is its input's first channel: any correct window bookkeeping reproduces the image."""

    def forward(self, x):
        return {"out": x[:, :1] * 1.0, "aux": None}


def test_sliding_window_inference_covers_the_image_and_averages_overlaps():
    assert slide_windows(10, 4, 3) == [0, 3, 6]
    assert slide_windows(11, 4, 3) == [0, 3, 6, 7]
    assert slide_windows(4, 4, 3) == [0]
    x = torch.randn(2, 3, 13, 21)
    out = predict(_Echo(), x, (13, 21), window=8, stride=5)
    torch.testing.assert_close(out, x[:, :1])
    up = predict(_Echo(), x, (26, 42))  # whole image, then resized to the labels' size
    assert up.shape == (2, 1, 26, 42)
    with pytest.raises(ValueError, match="at least 16px"):
        predict(_Echo(), x, (13, 21), window=16)


@pytest.mark.parametrize("kind", ["linear", "upernet"])
def test_dense_predictor_shapes_and_ragged_grid(kind):
    enc = create_encoder("mal_micro", image_size=(12, 20), dim=32, depth=2, num_heads=2, in_chans=3)
    model = DensePredictor(enc, 5, DenseHeadSettings(kind=kind, channels=8)).train()
    out = model(torch.randn(2, 3, 12, 20))
    assert out["out"].shape == (2, 5, 12, 20)
    assert (out["aux"] is not None) == (kind == "upernet")


def test_dense_config_refuses_mixup():
    with pytest.raises(ConfigError, match="mix_prob=0"):
        load_finetune_config("configs/finetune/mal_micro_scenes_seg.yaml", ["recipe.mix_prob=1.0"])


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_cli_dense_finetune_then_eval(tmp_path, capsys, task):
    out = tmp_path / task
    args = ["finetune", "--config", "configs/finetune/mal_micro_scenes_seg.yaml", "--task", task, *TINY, *RUN,
            "init.mode=scratch", "init.checkpoint=null", "head.channels=8", "optim.max_steps=3",
            "optim.batch_size=8", "run.image_every=3", f"run.out_dir={out}"]  # fmt: skip
    assert cli_main(args) == 0
    assert list((out / "images").glob("step_*.png"))
    model, cfg = load_dense_model(out)
    assert cfg.task == task and model.out_channels == (5 if task == "segmentation" else 1)
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(out), "--batch", "100"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(next(out.glob("eval_*/metrics.json")).read_text())
    if task == "segmentation":
        assert "mIoU" in printed and 0 <= metrics["miou"] <= 100 and 0 <= metrics["pixel_acc"] <= 100
    else:
        assert "RMSE" in printed and metrics["rmse"] > 0 and 0 <= metrics["delta1"] <= 100
