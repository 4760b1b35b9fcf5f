"""Fine-tuning: checkpoint round trip, position-embedding resize, layer decay, EMA, mixup/cutmix, short runs."""

from __future__ import annotations

import pytest
import torch

from helpers import FIXTURES
from mal.cli import main as cli_main
from mal.config import shipped_configs
from mal.engine import load_model_state, read_metrics
from mal.finetune import ClassificationTask, finetune, load_encoder_weights, load_finetune_config
from mal.finetune.tasks import build_classifier
from mal.io import read_weights_card, write_weights
from mal.models.layers import resize_pos_embed
from mal.pretrain.task import load_pretrain_config, pretrain
from mal.tasks.classification import MixupCutmix, one_hot_smooth

MODEL = ["model.name=mal_micro", "model.overrides={dim: 32, depth: 2, num_heads: 2}"]
DATA = ["data.image_size=16", "data.load_size=16", "data.hflip=false"]
RUN = ["run.progress=false", "run.tensorboard=false", "run.image_every=null", "run.log_every=1", "run.threads=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    cfg = load_pretrain_config(
        None,
        [*MODEL, *DATA, *RUN, "objective.decoder_dim=16", "objective.decoder_depth=1", "objective.decoder_heads=2",
         "optim.batch_size=16", "optim.max_steps=3", f"run.out_dir={out}"],
    )  # fmt: skip
    pretrain(cfg)
    return out


def ft_config(tmp_path, *overrides):
    return load_finetune_config(
        None, [*MODEL, *DATA, *RUN, "optim.batch_size=16", f"run.out_dir={tmp_path / 'ft'}", *overrides]
    )


def test_checkpoint_round_trip_loads_the_encoder_and_drops_the_decoder(pretrained, tmp_path):
    cfg = ft_config(tmp_path, f"init.checkpoint={pretrained}")
    state = load_model_state(pretrained)
    task = ClassificationTask(cfg, 1, 10, (0.5,), (0.5,), verbose=False)
    n_decoder = sum(k.startswith("decoder.") for k in state)
    assert n_decoder > 0 and "encoder.layout_record" in state
    assert task.load_report == {"loaded": len(state) - n_decoder, "dropped": n_decoder, "new_head": True}
    for k, v in task.model.encoder.state_dict().items():
        assert torch.equal(v, state[f"encoder.{k}"]), k
    # an encoder key the weights lack: an error that says so
    partial = {k: v for k, v in state.items() if "blocks.1." not in k}
    write_weights(
        tmp_path / "partial",
        partial,
        read_weights_card(pretrained / "checkpoints" / "step_00000003" / "model.safetensors"),
    )
    with pytest.raises(ValueError, match="missing"):
        load_encoder_weights(build_classifier(cfg, 1, 10), tmp_path / "partial")


def test_position_embedding_is_resized_to_a_ragged_grid(pretrained, tmp_path):
    # 20 px / 4 px patches = a 5x5 grid: 2x2 clusters become ragged (2, 2, 1)
    cfg = ft_config(tmp_path, f"init.checkpoint={pretrained}", "data.image_size=20")
    task = ClassificationTask(cfg, 1, 10, (0.5,), (0.5,), verbose=False)
    src = load_model_state(pretrained)["encoder.pos_embed.embed"]
    assert src.shape[1:3] == (4, 4)
    torch.testing.assert_close(task.model.encoder.pos_embed.embed.data, resize_pos_embed(src, (5, 5)))
    assert task.model(torch.randn(2, 1, 20, 20)).shape == (2, 10)


def test_layer_decay_groups(tmp_path):
    cfg = ft_config(tmp_path, "init.mode=scratch", "optim.layer_decay=0.5")
    task = ClassificationTask(cfg, 1, 10, (0.5,), (0.5,), verbose=False)
    groups = task.param_groups(0.05, 0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["encoder.patch_embed.proj.weight"] == 0.5**3 and scale["encoder.pos_embed.embed"] == 0.5**3
    assert all(s == 0.5**2 for n, s in scale.items() if n.startswith("encoder.blocks.0."))
    assert all(s == 0.5 for n, s in scale.items() if n.startswith("encoder.blocks.1."))
    assert scale["head.weight"] == 1.0 and scale["encoder.norm.weight"] == 1.0
    assert wd["head.weight"] == 0.05 and wd["head.bias"] == 0.0 and wd["encoder.pos_embed.embed"] == 0.0
    assert set(scale) == {n for n, _ in task.model.named_parameters()}
    assert task.model.layer_of("encoder.blocks.1.fwd.norm.weight") == 2 and task.model.num_layers == 2


def test_ema_update_math(tmp_path):
    cfg = ft_config(tmp_path, "init.mode=scratch", "recipe.ema_decay=0.9")
    task = ClassificationTask(cfg, 1, 10, (0.5,), (0.5,), verbose=False)
    w = task.model.head.weight
    first = w.detach().clone()
    task.after_step(0)  # the first update copies the weights
    torch.testing.assert_close(task.ema.module.head.weight, first)
    with torch.no_grad():
        w.add_(1.0)
    task.after_step(1)
    torch.testing.assert_close(task.ema.module.head.weight, 0.9 * first + 0.1 * (first + 1.0))


def test_mixup_and_cutmix_targets():
    labels = torch.tensor([0, 1, 2, 3])
    t = one_hot_smooth(labels, 5, 0.1)
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    assert t[0, 0] == pytest.approx(0.92) and t[0, 1] == pytest.approx(0.02)
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous()
    torch.manual_seed(0)
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        mix = MixupCutmix(5, mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1)
        for _ in range(10):
            images, targets = mix(x, labels)
            torch.testing.assert_close(targets.sum(1), torch.ones(4))
            # the share of sample 0's own label equals the share of its own pixels (values 0 vs 3 in image 0)
            own = 1 - images[0].mean() / 3.0
            lam = (targets[0, 0] - 0.02) / 0.9
            torch.testing.assert_close(own, lam, atol=1e-5, rtol=0)


def test_short_finetune_and_linear_probe(pretrained, tmp_path):
    result = finetune(ft_config(tmp_path, f"init.checkpoint={pretrained}", "optim.max_steps=6", "run.eval_every=3"))
    rows = read_metrics(tmp_path / "ft" / "metrics.jsonl", "val")
    assert len(rows) == 2 and {"top1", "top5", "ema_top1", "ema_top5", "loss"} <= rows[-1].keys()
    assert result.finished
    probe = ft_config(tmp_path, "init.mode=linear_probe", f"init.checkpoint={pretrained}", "optim.max_steps=3")
    probe.run.out_dir = str(tmp_path / "probe")
    res = finetune(probe)
    after = load_model_state(res.checkpoint)
    before = load_model_state(pretrained)
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("encoder."))
    assert not torch.equal(after["head.weight"], build_classifier(probe, 1, 10).head.weight)


def test_linear_probe_without_checkpoint_probes_the_random_encoder(tmp_path):
    probe = ft_config(tmp_path, "init.mode=linear_probe", "init.checkpoint=null", "optim.max_steps=3")
    init = ClassificationTask(probe, 1, 10, (0.5,), (0.5,), verbose=False).model.state_dict()  # same seed
    after = load_model_state(finetune(probe).checkpoint)
    enc = [k for k in after if k.startswith("encoder.")]
    assert enc and all(torch.equal(after[k], init[k]) for k in enc)  # the encoder stays at its random init
    assert not torch.equal(after["head.weight"], init["head.weight"])  # only the head trained


def test_linear_probe_with_batchnorm_normalizes_the_frozen_features(pretrained, tmp_path):
    from mal.finetune import load_classifier

    probe = ft_config(
        tmp_path, "init.mode=linear_probe", f"init.checkpoint={pretrained}", "recipe.probe_batchnorm=true",
        "optim.max_steps=3", "recipe.mix_prob=0",
    )  # fmt: skip
    res = finetune(probe)
    after = load_model_state(res.checkpoint)
    before = load_model_state(pretrained)
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("encoder."))
    assert "head.weight" not in after and after["head.1.weight"].shape == (10, 64)  # first + last token of width 32
    assert after["head.0.num_batches_tracked"] == 3 and after["head.0.running_var"].ne(1).all()  # stats updated
    assert not any(k.startswith("head.0.") and k.endswith(("weight", "bias")) for k in after)  # no affine part
    model, cfg = load_classifier(res.checkpoint)
    assert cfg.recipe.probe_batchnorm
    model.eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = torch.cat([tokens[:, 0], tokens[:, -1]], dim=-1)
        normed = (pooled - after["head.0.running_mean"]) / (after["head.0.running_var"] + 1e-6).sqrt()
        expected = normed @ after["head.1.weight"].T + after["head.1.bias"]
        torch.testing.assert_close(model(x), expected)


def test_init_settings_are_checked(tmp_path):
    from mal.config import ConfigError

    with pytest.raises(ConfigError, match="needs init.checkpoint"):
        ft_config(tmp_path)
    with pytest.raises(ConfigError, match="needs init.checkpoint"):
        ft_config(tmp_path, "init.mode=official", "init.checkpoint=null")
    with pytest.raises(ConfigError, match="takes no init.checkpoint"):
        ft_config(tmp_path, "init.mode=scratch", "init.checkpoint=x")
    with pytest.raises(ConfigError, match="probe_batchnorm applies to init.mode=linear_probe only"):
        ft_config(tmp_path, "init.mode=scratch", "recipe.probe_batchnorm=true")


class _Fixed(torch.nn.Module):
    """A 'classifier' whose logits are given per image, in dataset order."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.i = logits, 0

    def forward(self, x):
        out = self.logits[self.i : self.i + x.shape[0]]
        self.i += x.shape[0]
        return out


class _Images(torch.utils.data.Dataset):
    def __init__(self, labels, classes):
        self.labels, self.classes, self.num_classes = labels, classes, len(classes)
        self.mean, self.std, self.channels = (0.5,), (0.5,), 1

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.zeros(1, 8, 8, dtype=torch.uint8), self.labels[i]


def test_eval_on_a_class_subset_and_real_labels(tmp_path):
    from mal.tasks.classification import evaluate_classifier, load_class_map

    # a 2-class dataset ("cat", "dog") read from a 5-way model: cat -> logit 3, dog -> logit 1
    (tmp_path / "map.txt").write_text("dog 1\ncat 3\n")
    idx = load_class_map(tmp_path / "map.txt", ["cat", "dog"], 5)
    assert idx.tolist() == [3, 1]
    logits = torch.tensor([
        [9.0, 0, 0, 5, 0],  # argmax overall is logit 0 (not in the subset); among {3, 1}: 3 = cat -> right
        [9.0, 1, 0, 2, 0],  # among the subset: cat, truth dog -> wrong
        [0.0, 4, 0, 1, 0],  # dog -> right
    ])  # fmt: skip
    res = evaluate_classifier(
        _Fixed(logits), _Images([0, 1, 1], ["cat", "dog"]), image_size=8, batch_size=2, class_indices=idx,
        real_labels=[[0, 3], [], [2]],
    )  # fmt: skip
    assert res["top1"] == 66.67  # 2 of 3, in percent to two decimals
    assert res["confusion"] == [[1, 0], [1, 1]]
    assert res["per_class"] == pytest.approx([100.0, 50.0])
    # ReaL: image 0 predicts 0 (in [0, 3]) -> right; image 1 has no labels -> skipped; image 2 predicts 1 -> wrong
    assert res["real_top1"] == pytest.approx(50.0) and res["real_images"] == 2
    with pytest.raises(ValueError, match="no entry for dataset classes"):
        load_class_map(tmp_path / "map.txt", ["cat", "dog", "owl"], 5)
    with pytest.raises(ValueError, match="outside the model"):
        load_class_map(tmp_path / "map.txt", ["cat", "dog"], 2)


def test_eval_cli_on_a_finetuned_checkpoint(pretrained, tmp_path, capsys):
    import json

    from mal.cli import main as cli_main

    result = finetune(ft_config(tmp_path, f"init.checkpoint={pretrained}", "optim.max_steps=2"))
    out = tmp_path / "eval"
    assert cli_main(["eval", "--checkpoint", str(result.checkpoint), "--out", str(out), "--ema"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["images"] == 360 and len(metrics["per_class"]) == 10
    assert (out / "confusion.png").is_file() and "top-1" in capsys.readouterr().out
    assert cli_main(["eval", "--checkpoint", str(pretrained)]) == 2  # a pretraining checkpoint has no head


def test_eval_cli_reads_the_runs_data_options(tmp_path):
    """``mal eval`` of a classification run builds its data with the run's ``data.options`` (scenes labelled per
    image: 4 classes, not the 5 of the dense scenes, which it would refuse)."""
    import json

    cfg = load_finetune_config("configs/finetune/mal_micro_scenes_cls.yaml", [
        "init.mode=scratch", "init.checkpoint=null", "model.name=mal_micro", "model.overrides.dim=32",
        "model.overrides.depth=1", "model.overrides.num_heads=2", "data.image_size=16", "data.load_size=16",
        "optim.max_steps=1", "optim.batch_size=8", f"run.out_dir={tmp_path / 'ft'}", "run.progress=false",
    ])  # fmt: skip
    result = finetune(cfg)
    assert cli_main(["eval", "--checkpoint", str(result.checkpoint), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["data"] == "scenes" and metrics["images"] == 500 and len(metrics["per_class"]) == 4


def test_in_run_validation_and_mal_eval_agree_exactly(pretrained, tmp_path, capsys):
    """One classification evaluator: the run's last validation and ``mal eval`` of its checkpoint on the same split
    give the same numbers (counted per sample; the val split's 180 images leave a short last batch of 4)."""
    import json

    from mal.cli import main as cli_main

    result = finetune(ft_config(tmp_path, f"init.checkpoint={pretrained}", "optim.max_steps=2", "recipe.ema_decay=0.9"))
    val = read_metrics(tmp_path / "ft" / "metrics.jsonl", "val")[-1]
    out = tmp_path / "eval"
    for ema, prefix in ((False, ""), (True, "ema_")):
        args = ["eval", "--checkpoint", str(result.checkpoint), "--split", "val", "--out", str(out)]
        assert cli_main(args + (["--ema"] if ema else [])) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["images"] == 180
        assert metrics["top1"] == val[f"{prefix}top1"] and metrics["top5"] == val[f"{prefix}top5"]
        assert 100 * round(metrics["top1"] * 180 / 100) / 180 == pytest.approx(
            metrics["top1"], abs=0.005
        )  # count / 180
    assert metrics["loss"] > 0 and val["loss"] > 0
    capsys.readouterr()


def _jpeg_folder(root, per_class: int = 8):
    """root/{train,val}/{a,b}/ of JPEGs of several sizes and aspect ratios, as an ImageNet folder has."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(40, 30), (30, 44), (64, 32), (36, 36)]
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                w, h = sizes[i % len(sizes)]
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.jpg", quality=90)
    return root


def test_imagefolder_finetune_with_the_full_recipe_and_mal_eval_agree(tmp_path, capsys):
    """The papers' recipe on an ImageNet-style folder: crops from the full image and RandAugment in two loader
    workers, flip, mixup/cutmix and random erasing on the batch, evaluation at 18 px -> centre 16 px; ``mal eval``
    uses the same evaluation transform as the run's validation."""
    import json

    from mal.cli import main as cli_main

    root = _jpeg_folder(tmp_path / "data")
    recipe = [
        "data.name=imagefolder", f"data.root={root}", "data.load_size=18", "data.hflip=true", "data.num_workers=2",
        "data.randaugment=rand-m9-mstd0.5", "data.erase_prob=0.25", "data.eval_crop=0.875", "init.mode=scratch",
        "optim.max_steps=2", "optim.batch_size=8",
    ]  # fmt: skip
    cfg = ft_config(tmp_path, *recipe)
    assert cfg.data.eval_crop == 0.875 and cfg.data.randaugment == "rand-m9-mstd0.5"
    result = finetune(cfg)
    assert result.finished and result.step == 2 and result.train_loss > 0
    val = read_metrics(tmp_path / "ft" / "metrics.jsonl", "val")[-1]
    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", str(result.checkpoint), "--split", "val", "--out", str(out)]
    assert cli_main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 16 and metrics["top1"] == val["top1"] and metrics["loss"] == pytest.approx(val["loss"])
    capsys.readouterr()


def test_official_vil_weights_initialize_the_encoder(tmp_path):

    from safetensors.torch import load_file

    stored = load_file(FIXTURES / "vil2_mini.safetensors")
    official = {k.removeprefix("param."): v for k, v in stored.items() if k.startswith("param.")}
    fixture = tmp_path / "vil2_mini.pth"  # an official state dict as the official code saves it
    torch.save(official, fixture)
    w = official["patch_embed.proj.weight"]  # (D, C, p, p)
    cfg = load_finetune_config(  # the architecture is read from the weights
        None, ["data.image_size=32", "init.mode=official", f"init.checkpoint={fixture}", f"run.out_dir={tmp_path}"]
    )
    task = ClassificationTask(cfg, w.shape[1], 7, (0.5,) * 3, (0.5,) * 3, verbose=False)
    encoder_tensors = len(task.model.encoder.state_dict())  # with the layout record of the raster layout
    assert task.load_report == {"loaded": encoder_tensors, "dropped": 2, "new_head": True}  # not its 10-way head
    torch.testing.assert_close(task.model.encoder.patch_embed.proj.weight, w)
    assert task.model.head.weight.shape[0] == 7  # a new head


SHIPPED_FT = list(shipped_configs("finetune"))


@pytest.mark.parametrize("name", SHIPPED_FT)
def test_shipped_finetune_configs_validate(name, capsys):
    assert cli_main(["finetune", "--config", name, "--print-config"]) == 0
    assert "init:" in capsys.readouterr().out
    cfg = load_finetune_config(name)
    if cfg.data.name == "imagefolder":  # the papers' ImageNet recipe (docs/DESIGN.md, 'Fine-tuning')
        size = name.split("_")[1]
        assert cfg.init.checkpoint == f"runs/pretrain/mal_{size}_imagenet"
        assert load_pretrain_config(f"mal_{size}_imagenet").data.image_size == 192 and cfg.data.image_size == 224
        d, r, o = cfg.data, cfg.recipe, cfg.optim
        assert (d.randaugment, d.erase_prob, d.eval_crop, d.load_size) == ("rand-m9-mstd0.5", 0.25, 0.875, 256)
        assert (r.mixup, r.cutmix, r.label_smoothing, r.ema_decay is not None) == (0.8, 1.0, 0.1, True)
        assert r.drop_path == {"tiny": 0.0, "small": 0.05, "base": 0.2}[size]
        assert (o.epochs, o.batch_size, o.blr, o.warmup_epochs, o.betas) == (200, 1024, 5e-4, 5, (0.9, 0.999))
        assert 0.65 <= o.layer_decay <= 0.75
