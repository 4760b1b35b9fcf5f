"""``mal predict`` and the class names a classifier carries: a fine-tuned classifier records its data's class
names (``pretrained_cfg["label_names"]``, in ``config.json``) and ``mal.load_model`` restores them; ``mal predict``
gives the top-k with those names for a folder of images (an unreadable file named on stderr, the rest predicted),
and one PNG per image at the image's size for a segmentation or depth model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from helpers import image_folder
from mal.cli import main as cli_main

MODEL = ["model.name=mal_micro", "model.overrides={dim: 32, depth: 2, num_heads: 2}", "init.mode=scratch",
         "init.checkpoint=null"]  # fmt: skip
RUN = ["run.progress=false", "run.tensorboard=false", "run.image_every=null", "run.threads=1"]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A classifier fine-tuned for 2 steps on an ImageFolder of classes ``a`` and ``b``, with a centre crop."""
    tmp = tmp_path_factory.mktemp("cls")
    root = image_folder(tmp / "data", n_good=4, n_bad=0)
    out = tmp / "run"
    args = ["finetune", *MODEL, *RUN, "data.name=imagefolder", f"data.root={root}", "data.image_size=16",
            "data.load_size=18", "data.eval_crop=0.875", "data.num_workers=0", "optim.max_steps=2",
            "optim.batch_size=4", "run.eval_every=null", f"run.out_dir={out}"]  # fmt: skip
    assert cli_main(args) == 0
    return out


def pictures(folder, sizes, *, bad=(), gray=()):
    """PNGs ``folder/<name>.png`` of the given ``(h, w)`` sizes (``gray``: single-channel ones) and corrupt files."""
    rng = np.random.default_rng(1)
    for name, (h, w) in sizes.items():
        path = folder / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (h, w) if name in gray else (h, w, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    for name in bad:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_finetuned_classifier_carries_its_class_names(classifier_run, tmp_path):
    import mal

    card = json.loads(next((classifier_run / "checkpoints").glob("step_*/config.json")).read_text())
    assert card["pretrained_cfg"]["label_names"] == ["a", "b"] and card["pretrained_cfg"]["crop_pct"] == 0.875
    model = mal.load_model(classifier_run)
    assert model.pretrained_cfg["label_names"] == ["a", "b"] and model.pretrained_cfg["crop_pct"] == 0.875
    saved = mal.load_model(mal.save_model(model, tmp_path / "saved"))  # a save_model folder keeps them too
    assert saved.pretrained_cfg["label_names"] == ["a", "b"]
    saved.reset_classifier(2)  # the same number of classes: the names still fit
    assert saved.pretrained_cfg["label_names"] == ["a", "b"]
    saved.reset_classifier(3)  # another head: its names are unknown
    assert "label_names" not in saved.pretrained_cfg and "label_names" not in saved.mal_card()["pretrained_cfg"]
    with pytest.raises(ValueError, match="2 label names for a head of 3 classes"):
        saved.set_label_names(["x", "y"])
    # fine-tuning from the classifier with other data does not inherit the names
    assert "label_names" not in mal.create_model(classifier_run, num_classes=2).pretrained_cfg


def test_predict_a_folder_names_the_unreadable_file_and_predicts_the_rest(classifier_run, tmp_path, capsys):
    folder = pictures(
        tmp_path / "imgs", {"b/2": (30, 20), "a/1": (25, 25), "0": (16, 40), "c": (9, 12)}, bad=["b/bad.png"],
        gray=["c"],
    )  # fmt: skip
    (folder / "notes.txt").write_text("not an image, not looked at")
    out = tmp_path / "preds.csv"
    capsys.readouterr()
    args = ["predict", "--checkpoint", str(classifier_run), str(folder), "--topk", "5", "--batch-size", "2"]
    assert cli_main([*args, "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert len(err) == 1 and str(folder / "b" / "bad.png") in err[0] and "cannot read" in err[0]
    rows = read_rows(out)
    good = [str(folder / n) for n in ("0.png", "a/1.png", "b/2.png", "c.png")]  # sorted, recursively
    assert list(dict.fromkeys(r["path"] for r in rows)) == good
    assert list(rows[0]) == ["path", "rank", "class", "name", "probability"]
    for path in good:
        mine = [r for r in rows if r["path"] == path]
        probs = [float(r["probability"]) for r in mine]
        assert [int(r["rank"]) for r in mine] == [1, 2]  # top-5 of 2 classes: clamped to 2
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5 and min(probs) >= 0
        assert {r["name"] for r in mine} == {"a", "b"}
        assert all(r["name"] == "ab"[int(r["class"])] for r in mine)
        assert path in printed
    assert "top-1" in printed and f"wrote {out}" in printed and "1 unreadable" in printed
    assert not list(tmp_path.glob(".preds.csv*"))  # written next to it and renamed


def test_predict_top1_of_single_files_and_the_same_file_once(classifier_run, tmp_path, capsys):
    folder = pictures(tmp_path / "imgs", {"x": (20, 20), "y": (24, 18)})
    out = tmp_path / "one.csv"
    files = [str(folder / "x.png"), str(folder / "y.png"), str(folder / "x.png")]
    assert cli_main(["predict", "--checkpoint", str(classifier_run), *files, "--topk", "1", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert [r["path"] for r in rows] == files[:2] and all(r["rank"] == "1" for r in rows)
    assert all(0.5 <= float(r["probability"]) <= 1 for r in rows)  # the top class of two
    capsys.readouterr()


def test_predict_exits_2_when_no_image_can_be_read(classifier_run, tmp_path, capsys):
    folder = pictures(tmp_path / "bad", {}, bad=["1.png", "2.jpg"])
    capsys.readouterr()
    assert (
        cli_main(["predict", "--checkpoint", str(classifier_run), str(folder), "--out", str(tmp_path / "p.csv")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "1.png" in err[0] and "2.jpg" in err[1] and "none of the 2" in err[2]
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing_folder"], "no such file or folder"),
        (["{empty}"], "no image files"),
        (["{empty}", "--topk", "0"], "--topk"),
        (["{empty}", "--out", "{empty}"], "is a folder"),
    ],
)
def test_bad_arguments_stop_with_one_line(classifier_run, tmp_path, capsys, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    if "--out" in args:  # an existing image so that the check of --out is reached
        pictures(empty, {"x": (16, 16)})
    args = [a.format(empty=empty) for a in args]
    assert cli_main(["predict", "--checkpoint", str(classifier_run), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mal predict: error:") and message in err[0]


@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_dense_models_write_one_png_per_image_at_its_size(tmp_path, capsys, task):
    import mal
    from mal.data import SCENE_CLASSES
    from mal.tasks.predict import DEPTH_PNG_SCALE

    run = tmp_path / "run"
    args = ["finetune", "--config", "mal_micro_scenes_seg", "--task", task, *MODEL, *RUN, "data.image_size=16",
            "data.load_size=16", "head.channels=8", "optim.max_steps=1", "optim.batch_size=8", "run.eval_every=null",
            f"run.out_dir={run}"]  # fmt: skip
    assert cli_main(args) == 0
    names = mal.load_model(run).encoder.pretrained_cfg.get("label_names")
    assert names == (list(SCENE_CLASSES) if task == "segmentation" else None)
    sizes = {"p": (20, 28), "sub/q": (33, 17)}
    folder = pictures(tmp_path / "imgs", sizes, bad=["sub/broken.png"])
    out = tmp_path / "maps"
    capsys.readouterr()
    assert cli_main(["predict", "--checkpoint", str(run), str(folder), "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "broken.png" in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["p.png", "sub/q.png"]
    for name, (h, w) in sizes.items():
        img = Image.open(out / f"{name}.png")
        arr = np.asarray(img)
        assert arr.shape == (h, w)
        if task == "segmentation":
            assert img.mode == "P" and arr.max() < len(SCENE_CLASSES)
        else:
            assert img.mode in ("I;16", "I") and arr.min() >= 1
            assert 0 < arr.mean() / DEPTH_PNG_SCALE < 100  # metres
    assert "wrote 2 PNG(s)" in printed


def test_images_are_preprocessed_as_the_runs_validation(classifier_run):
    """The run's validation: ImageFolder decodes at load_size 18 (bicubic, centre square), BatchAugment crops the
    centre 16 px (eval_crop 0.875) and normalizes; a Predictor does the same from the model's pretrained_cfg."""
    import torch

    import mal
    from mal.data import BatchAugment, ImageFolderDataset
    from mal.tasks.predict import Predictor

    model = mal.load_model(classifier_run)
    val = ImageFolderDataset(classifier_run.parent / "data", "val", load_size=18)
    augment = BatchAugment(16, train=False, eval_crop=0.875, mean=val.mean, std=val.std)
    inputs = augment(torch.stack([val[i][0] for i in range(len(val))]))  # (B, 3, 16, 16)
    expected = model(inputs).softmax(-1)
    predictor = Predictor(model, topk=2)
    read = [predictor.read(path) for path, _ in val.samples]
    torch.testing.assert_close(torch.stack([x for x, _ in read]), inputs, rtol=0, atol=0)
    assert {size for _, size in read} == {(18, 18)}
    got = predictor(read)
    for top, p in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.tensor(top.probs), p[top.indices], rtol=0, atol=1e-6)
        assert top.indices[0] == int(p.argmax())


def test_a_saved_classifier_without_names_is_predicted_with_indices(tmp_path, capsys):
    import mal

    model = mal.create_model("mal_micro", num_classes=3, image_size=16, dim=32, depth=2, num_heads=2)
    assert "label_names" not in model.pretrained_cfg and "crop_pct" not in model.pretrained_cfg
    folder = mal.save_model(model, tmp_path / "saved")
    images = pictures(tmp_path / "imgs", {"x": (40, 30)})
    out = tmp_path / "p.csv"
    assert cli_main(["predict", "--checkpoint", str(folder), str(images), "--topk", "3", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and all(r["name"] == r["class"] for r in rows)
    assert sum(float(r["probability"]) for r in rows) == pytest.approx(1, abs=1e-5)
    assert "class indices" in capsys.readouterr().out
