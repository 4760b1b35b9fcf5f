"""Models that know what they are: the layout record in the weights, self-describing files (config.json +
model.safetensors), mal.load_model / save_model, fine-tuning that inherits the pretraining's model, the timm
surface, NX-AI weights and export."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mal
from helpers import FIXTURES
from mal.cli import main as cli_main
from mal.config import ConfigError
from mal.engine import load_model_state
from mal.finetune import finetune, load_classifier, load_finetune_config
from mal.io import read_weights_card
from mal.models.factory import adapt_input_conv
from mal.pretrain import MALPretrainer
from mal.pretrain.task import load_pretrain_config, pretrain
from mal.tokens import unserialize

FIXTURE = FIXTURES / "vil2_mini.safetensors"
SMALL = dict(dim=32, depth=2, num_heads=2, in_chans=1)
RUN = ["run.progress=false", "run.tensorboard=false", "run.image_every=null", "run.log_every=1", "run.threads=1"]
# digits at 32 px: an 8x8 patch grid in 2x2 clusters of 4x4 patches
PRE = ["model.name=mal_micro", "model.overrides={dim: 32, depth: 2, num_heads: 2, layout: {cluster_size: 4}}",
       "data.image_size=32", "objective.decoder_dim=16", "objective.decoder_depth=1", "objective.decoder_heads=2",
       "optim.batch_size=16", "optim.max_steps=2", *RUN]  # fmt: skip
FT = ["data.image_size=32", "optim.batch_size=16", "optim.max_steps=2", "recipe.ema_decay=0.9", *RUN]


def small(name: str = "mal_micro", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return mal.create_model(name, num_classes=10, **{**SMALL, **kw}).eval()


def official_state() -> dict[str, torch.Tensor]:
    return {k.removeprefix("param."): v for k, v in load_file(FIXTURE).items() if k.startswith("param.")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny pretraining run and a classification fine-tuning run from it (with an EMA)."""
    root = tmp_path_factory.mktemp("runs")
    pretrain(load_pretrain_config(None, [*PRE, f"run.out_dir={root / 'pre'}"]))
    cfg = load_finetune_config(
        "configs/finetune/mal_micro_digits.yaml", [*FT, f"init.checkpoint={root / 'pre'}", f"run.out_dir={root / 'ft'}"]
    )
    finetune(cfg)
    return root


# ---------------------------------------------------------------------------------------------- the layout record


def test_the_preset_layout_cannot_silently_load_weights_of_another_layout(tmp_path):
    """The issue's case: weights of 4x4-patch clusters loaded into mal_micro's 2x2-patch preset."""
    trained = small(layout={"cluster_size": 4})
    state = trained.state_dict()
    assert state["encoder.layout_record"].dtype == torch.uint8
    preset = small()
    with pytest.raises(ValueError, match=r"2x2 clusters of \(4, 4\) patches.*4x4 clusters of \(2, 2, 2, 2\) patches"):
        preset.load_state_dict(state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")  # the raw tensors only
    with pytest.raises(ValueError, match="token layout"):
        preset.load_state_dict(load_file(tmp_path / "w.safetensors"), strict=True)
    same = small(layout={"cluster_size": 4})
    same.load_state_dict(state)  # the same layout loads
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(same(x), trained(x), rtol=0, atol=0)


def test_layouts_that_serialize_alike_load_and_old_weights_warn():
    by_size = small(layout={"cluster_size": 4})  # 8x8 grid: clusters of 4 == a 2x2 cluster grid
    by_grid = small(layout={"cluster_grid": 2})
    by_grid.load_state_dict(by_size.state_dict())
    other_schedule = small(layout={"cluster_size": 4, "scan_schedule": "fixed:row"})
    with pytest.raises(ValueError, match="scan schedule fixed:row"):
        other_schedule.load_state_dict(by_size.state_dict())
    old = {k: v for k, v in by_size.state_dict().items() if k != "encoder.layout_record"}
    with pytest.warns(UserWarning, match="no layout record"):
        by_size.load_state_dict(old)


def test_layout_options_live_in_the_layout():
    with pytest.raises(ValueError, match=r"layout=\{'cluster_size': 4\}"):
        mal.create_model("mal_micro", cluster_size=4)
    with pytest.raises(ConfigError, match="cluster_sise"):
        load_pretrain_config(None, ["model.name=mal_micro", "model.overrides.layout.cluster_sise=4"])
    with pytest.raises(ValueError, match="unknown layout option"):
        mal.create_model("mal_micro", layout={"cluster_sise": 4})


# -------------------------------------------------------------------------------------- self-describing weights


def test_checkpoints_carry_their_model_description(runs):
    for run, kind in (("pre", "pretrainer"), ("ft", "classifier")):
        ckpt = sorted((runs / run / "checkpoints").glob("step_*"))[-1]
        card = json.loads((ckpt / "config.json").read_text())
        meta = read_weights_card(ckpt / "model.safetensors")
        assert card == meta  # config.json and the safetensors metadata agree
        assert card["kind"] == kind and card["family"] == "vil" and card["format"] == "mal-model"
        assert card["config"]["dim"] == 32 and card["config"]["layout"]["cluster_size"] == 4
        assert card["config"]["layout"]["grid"] == [8, 8]
        assert card["pretrained_cfg"]["architecture"] == "mal_micro"
        mean = card["pretrained_cfg"]["mean"]
        assert len(mean) == 1 and mean[0] != 0.5  # the digits' own normalization was recorded
    assert (
        json.loads((sorted((runs / "pre" / "checkpoints").glob("step_*"))[-1] / "config.json").read_text())[
            "pretraining"
        ]["objective"]["decoder_dim"]
        == 16
    )


def test_load_model_rebuilds_each_kind_in_eval_mode(runs, tmp_path):
    x = torch.randn(3, 1, 32, 32)
    clf = mal.load_model(runs / "ft")
    ref, _ = load_classifier(runs / "ft")
    assert not clf.training and clf.encoder.layout.num_clusters == 4
    torch.testing.assert_close(clf(x), ref(x), rtol=0, atol=0)
    ema = mal.load_model(runs / "ft", ema=True)
    ref_ema, _ = load_classifier(runs / "ft", ema=True)
    torch.testing.assert_close(ema(x), ref_ema(x), rtol=0, atol=0)
    assert not torch.equal(ema(x), clf(x))

    enc = mal.load_model(runs / "pre")
    state = load_model_state(runs / "pre")
    assert not enc.training and not hasattr(enc, "decoder")
    for k, v in enc.state_dict().items():
        assert torch.equal(v, state[f"encoder.{k}"]), k
    full = mal.load_model(runs / "pre", decoder=True)
    assert isinstance(full, MALPretrainer) and full.cfg.decoder_dim == 16
    assert set(full.state_dict()) == set(state)
    with pytest.raises(ValueError, match="no decoder"):
        mal.load_model(runs / "ft", decoder=True)

    # a lone .safetensors file describes itself through its metadata
    lone = tmp_path / "copy.safetensors"
    lone.write_bytes((sorted((runs / "ft" / "checkpoints").glob("step_*"))[-1] / "model.safetensors").read_bytes())
    torch.testing.assert_close(mal.load_model(lone)(x), clf(x), rtol=0, atol=0)


def test_save_model_round_trip_and_weights_without_description(tmp_path):
    model = small(layout={"cluster_size": 4, "scan_schedule": "fixed:column"})
    folder = mal.save_model(model, tmp_path / "saved")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    x = torch.randn(2, 1, 32, 32)
    back = mal.load_model(folder)
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    mal.save_model(small(), folder)  # a second save replaces the first
    assert mal.load_model(folder).cfg.layout.cluster_size == 2
    save_file({"w": torch.zeros(1)}, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="carries no model description"):
        mal.load_model(tmp_path / "bare.safetensors")
    with pytest.raises(FileNotFoundError):
        mal.load_model(tmp_path / "nothing")


@pytest.mark.slow
@pytest.mark.parametrize("name", mal.list_models())
def test_save_and_load_every_registered_model_to_identical_outputs(name, tmp_path):
    torch.manual_seed(0)
    image = 32 if name.endswith("micro") else 64  # a small input keeps the forward cheap; the weights are full size
    model = mal.create_model(name, num_classes=7, image_size=image).eval()
    back = mal.load_model(mal.save_model(model, tmp_path / name))
    assert type(back) is type(model) and back.cfg == model.cfg
    x = torch.randn(2, 3, image, image)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
        again = mal.create_model(name, pretrained=tmp_path / name)
        assert torch.equal(again.eval()(x), model(x))


# --------------------------------------------------------------------------- fine-tuning inherits the pretraining


def test_finetuning_takes_the_checkpoints_architecture_layout_and_cluster_grid(runs, tmp_path):
    cfg = load_finetune_config(
        "configs/finetune/mal_micro_digits.yaml",
        [*FT, "data.image_size=48", f"init.checkpoint={runs / 'pre'}", f"run.out_dir={tmp_path / 'a'}"],
    )
    finetune(cfg)
    model = mal.load_model(tmp_path / "a")
    assert model.cfg.dim == 32 and model.cfg.image_size == 48
    layout = model.encoder.layout  # 12x12 patches: the pretraining's 2x2 cluster grid, clusters of 6
    assert layout.cluster_ids.unique().numel() == 4 and layout.row_spans == (6, 6)
    # restating the layout is fine; another one is an error unless the run says it is an ablation
    same = [*FT, f"init.checkpoint={runs / 'pre'}", "model.overrides.layout.cluster_size=4"]
    finetune(load_finetune_config("configs/finetune/mal_micro_digits.yaml", [*same, f"run.out_dir={tmp_path / 'b'}"]))
    other = [*FT, f"init.checkpoint={runs / 'pre'}", "model.overrides.layout.cluster_size=2"]
    with pytest.raises(ValueError, match="allow_layout_change"):
        finetune(load_finetune_config("configs/finetune/mal_micro_digits.yaml", [*other, f"run.out_dir={tmp_path}/c"]))
    ablation = [*other, "model.allow_layout_change=true", f"run.out_dir={tmp_path / 'd'}"]
    finetune(load_finetune_config("configs/finetune/mal_micro_digits.yaml", ablation))
    assert mal.load_model(tmp_path / "d").encoder.layout.num_clusters == 16
    with pytest.raises(ValueError, match="architecture"):
        bad = [*FT, f"init.checkpoint={runs / 'pre'}", "model.overrides.dim=64", f"run.out_dir={tmp_path / 'e'}"]
        finetune(load_finetune_config("configs/finetune/mal_micro_digits.yaml", bad))
    with pytest.raises(ConfigError, match="model.name"):
        load_finetune_config("configs/finetune/mal_micro_digits.yaml", ["init.mode=scratch", "init.checkpoint=null"])


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 384])
def test_mal_tiny_pretrained_at_192_keeps_its_3x3_cluster_grid(size, tmp_path):
    """The papers' protocol through the CLI: 1 step of pretraining at 192 px, 1 of fine-tuning at a new size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(2):
                img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                img.save(tmp_path / "data" / split / c / f"{i}.png")
    quick = ["optim.max_steps=1", "optim.batch_size=2", "data.num_workers=0", f"data.root={tmp_path / 'data'}", *RUN]
    assert cli_main(["pretrain", "--config", "configs/pretrain/mal_tiny_imagenet.yaml", *quick,
                     "objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2",
                     f"run.out_dir={tmp_path / 'pre'}"]) == 0  # fmt: skip
    assert cli_main(["finetune", "--config", "configs/finetune/mal_micro_digits.yaml", *quick,
                     "data.name=imagefolder", f"data.image_size={size}", f"data.load_size={size}",
                     "data.label_fraction=1.0", f"init.checkpoint={tmp_path / 'pre'}",
                     f"run.out_dir={tmp_path / 'ft'}"]) == 0  # fmt: skip
    model = mal.load_model(tmp_path / "ft")
    g = size // 16
    assert model.encoder.layout.cluster_ids.unique().numel() == 9
    assert sum(model.encoder.layout.row_spans) == g and len(model.encoder.layout.row_spans) == 3


# ----------------------------------------------------------------------------------------------- the timm surface


def test_create_model_with_pretrained_weights_new_head_and_channels(runs):
    x1, x3 = torch.randn(2, 1, 32, 32), torch.randn(2, 3, 32, 32)
    same = mal.create_model("mal_micro", pretrained=runs / "ft").eval()
    torch.testing.assert_close(same(x1), mal.load_model(runs / "ft")(x1), rtol=0, atol=0)
    assert same.load_report["new_head"] is False
    five = mal.create_model("mal_micro", pretrained=runs / "ft", num_classes=5)
    assert five.load_report["new_head"] and five.eval()(x1).shape == (2, 5)
    rgb = mal.create_model("mal_micro", pretrained=runs / "ft", in_chans=3)
    saved = load_model_state(runs / "ft")["encoder.patch_embed.proj.weight"]  # (D, 1, p, p)
    torch.testing.assert_close(rgb.encoder.patch_embed.proj.weight.data, saved.repeat(1, 3, 1, 1) / 3)
    assert rgb.eval()(x3).shape == (2, 10)
    enc = mal.create_encoder("mal_micro", pretrained=runs / "pre")
    assert enc.layout.num_clusters == 4 and enc(x1).shape == (2, 64, 32)
    with pytest.raises(ValueError, match="architecture of 'mal_base'"):
        mal.create_model("mal_base", pretrained=runs / "ft")
    with pytest.raises(ValueError, match="is a VIT"):
        mal.create_model("vit_micro", pretrained=runs / "ft")


def test_adapt_input_conv_follows_timm():
    w = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(adapt_input_conv(w, 1), w.sum(1, keepdim=True))
    five = adapt_input_conv(w, 5)
    torch.testing.assert_close(five[:, :3], w * 3 / 5)
    torch.testing.assert_close(five[:, 3:], w[:, :2] * 3 / 5)


def tokens_width(model, x) -> int:  # noqa: ANN001
    return model.forward_features(x).shape[-1]


def test_classifier_surface():
    assert mal.list_models("mal_*") == ["mal_base", "mal_micro", "mal_small", "mal_tiny"]
    assert mal.list_models("*micro") == ["arm_micro", "mal_micro", "vil_micro", "vim_micro", "vit_micro"]
    x = torch.randn(2, 1, 32, 32)
    for name, width in (("mal_micro", 64), ("vit_micro", 32)):
        model = small(name)
        # timm: num_features = the feature width (forward_features' channels), head_hidden_size = what the head reads
        assert model.num_features == 32 and tokens_width(model, x) == 32
        assert model.head_hidden_size == width and model.get_classifier().in_features == width
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
        assert pooled.shape == (2, width)
        torch.testing.assert_close(model.get_classifier()(pooled), model(x))
        model.reset_classifier(3)
        assert model(x).shape == (2, 3) and model.num_classes == 3 and model.pretrained_cfg["num_classes"] == 3
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)
        cfg = model.pretrained_cfg
        assert cfg["input_size"] == (1, 32, 32) and cfg["layout"]["cluster_size"] == 2
        assert cfg["first_conv"] == "encoder.patch_embed.proj" and cfg["architecture"] == name


def test_forward_intermediates_come_back_in_raster_order():
    model = small(layout={"cluster_size": 4, "scan_schedule": "alternating"})
    x = torch.randn(2, 1, 32, 32)
    final, maps = model.forward_intermediates(x, indices=[0, -1])
    assert torch.equal(final, model.forward_features(x)) and len(maps) == 2
    _, canonical = model.encoder.forward_intermediates(x, [0, 1])
    order = model.encoder.layout.order  # canonical position -> raster index
    for fmap, seq in zip(maps, canonical, strict=True):
        assert fmap.shape == (2, 32, 8, 8)
        raster = unserialize(seq, order)
        torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), raster, rtol=0, atol=0)
        # the token of raster cell (h, w) sits at fmap[:, :, h, w]
        h, w = 1, 6
        assert torch.equal(fmap[:, :, h, w], seq[:, int(model.encoder.layout.inverse[h * 8 + w])])
    nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", norm=True, intermediates_only=True)
    assert len(nlc) == 1 and nlc[0].shape == (2, 64, 32)
    torch.testing.assert_close(nlc[0], unserialize(final, order))  # the last layer + the final norm = features
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[5])


# ------------------------------------------------------------------------------------------------- NX-AI weights


@pytest.mark.parametrize("suffix", [".th", ".pth", ".safetensors"])
def test_official_weights_from_files_and_wrappers(tmp_path, suffix):
    state = official_state()
    path = tmp_path / f"vil2{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)  # as NX-AI publishes them
    model = mal.vil_from_official(path)  # dims, depth, patch, classes and image size read from the weights
    assert not model.training and model.cfg.dim == 64 and model.cfg.patch_size == 4 and model.cfg.num_classes == 10
    tensors = load_file(FIXTURE)
    with torch.no_grad():
        torch.testing.assert_close(model(tensors["input"]), tensors["logits"], atol=2e-5, rtol=0)
    swapped = mal.vil_from_official(path, num_classes=3, in_chans=1)
    assert swapped.load_report["new_head"] and swapped(torch.randn(1, 1, 32, 32)).shape == (1, 3)
    torch.testing.assert_close(
        swapped.encoder.patch_embed.proj.weight, state["patch_embed.proj.weight"].sum(1, keepdim=True)
    )


def test_official_weights_bad_input_is_one_clear_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"\.th, \.pth"):
        mal.vil_from_official(tmp_path / "notes.txt")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        mal.vil_from_official(tmp_path / "odd.pth")
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an official VisionLSTM2"):
        mal.vil_from_official(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="differs from the weights'"):
        mal.vil_from_official(official_state(), layout={"cluster_size": 2})


def test_cli_finetunes_from_official_weights_without_model_options(tmp_path, capsys):
    state = official_state()
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"][:, :1].contiguous()  # a 1-channel model
    torch.save({"state_dict": state}, tmp_path / "vil2.pth")
    args = ["finetune", "--config", "configs/finetune/mal_micro_digits.yaml", "init.mode=official",
            f"init.checkpoint={tmp_path / 'vil2.pth'}", *FT, f"run.out_dir={tmp_path / 'ft'}"]  # fmt: skip
    assert cli_main(args) == 0
    model = mal.load_model(tmp_path / "ft")
    assert model.cfg.dim == 64 and model.encoder.layout.num_clusters == 64  # the official raster layout
    torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "bad.pth")
    bad = [*args[:4], f"init.checkpoint={tmp_path / 'bad.pth'}", *FT, f"run.out_dir={tmp_path / 'bad'}"]
    capsys.readouterr()
    assert cli_main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an official VisionLSTM2" in err[0]


# ------------------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["mal_micro", "vit_micro"])
def test_torch_export_and_onnx_match_pytorch(name, tmp_path):
    import onnxruntime

    model = small(
        name, layout={"cluster_size": 4, "scan_schedule": "alternating" if name == "mal_micro" else "fixed:row"}
    )
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected, atol=1e-5, rtol=0)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=True, input_names=["images"], output_names=["logits"])
    session = onnxruntime.InferenceSession(str(path))
    (out,) = session.run(None, {"images": x.numpy()})
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["mal_micro", "vit_micro", "arm_micro"])
def test_grad_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(name):
    heads = {} if name.startswith("arm") else {"num_heads": 2}
    model = mal.create_model(name, num_classes=3, in_chans=1, dim=32, depth=3, drop_path_rate=0.1, **heads).double()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)

    def step() -> tuple[torch.Tensor, list[torch.Tensor], int]:
        saved = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel() * t.element_size())
            return t

        model.zero_grad()
        torch.manual_seed(5)  # the same drop-path draws: checkpointing replays the RNG state
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()], sum(saved)

    model.train()
    plain, grads, plain_bytes = step()
    model.set_grad_checkpointing()
    assert model.encoder.grad_checkpointing
    ckpt, grads_ckpt, ckpt_bytes = step()
    torch.testing.assert_close(ckpt, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_ckpt, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert ckpt_bytes < plain_bytes / 2  # the blocks' activations are recomputed, not kept
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=1e-12, atol=1e-12)  # inference is unaffected


def test_group_matcher_and_img_size_follow_timm():
    import re

    model = mal.create_model("mal_micro", num_classes=3, img_size=48)  # timm's spelling of image_size
    assert model.cfg.image_size == 48
    with pytest.raises(ValueError, match="give image_size or img_size"):
        mal.create_model("mal_micro", img_size=48, image_size=32)
    matcher = model.group_matcher()
    for name, _ in model.named_parameters():
        layer = model.layer_of(name)
        if re.match(matcher["stem"], name):
            assert layer == 0, name
        elif m := re.match(matcher["blocks"][0][0], name):
            assert layer == int(m.group(1)) + 1, name
        else:
            assert layer == model.num_layers + 1, name  # final norm and head after every block
