"""timm interop: a saved model loads through ``timm.create_model("local-dir:...")`` with its weights, mal's names are
timm models once registered (by ``import mal`` after ``import timm``, or ``mal.register_timm_models()``), and timm's
data config reads the model's ``pretrained_cfg``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm  # the dev extra has it: CI runs these
import torch

import mal


def test_a_saved_model_loads_through_timm_with_its_weights(tmp_path):
    mal.register_timm_models()
    torch.manual_seed(0)
    model = mal.create_model("vim_micro", num_classes=7).eval()
    folder = mal.save_model(model, tmp_path / "saved")
    card = json.loads((folder / "config.json").read_text())
    assert card["architecture"] == "vim_micro" and card["num_classes"] == 7 and card["model_args"] == card["config"]
    back = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert type(back) is type(model) and torch.equal(back(x), model(x))
    # timm's options go through: a new head on the saved weights
    three = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=3)
    assert three.num_classes == 3 and torch.equal(three.encoder.pos_embed.embed, model.encoder.pos_embed.embed)
    cfg = timm.data.resolve_data_config({}, model=back)
    assert cfg["input_size"] == (3, 32, 32) and cfg["interpolation"] == "bicubic"


def test_registered_names_build_fresh_models_and_without_weights_say_so():
    mal.register_timm_models()
    assert set(mal.list_models()) <= set(timm.list_models())
    fresh = timm.create_model("mal_micro", num_classes=3, img_size=64)
    assert fresh.cfg.image_size == 64 and fresh.num_classes == 3
    with pytest.raises(RuntimeError, match="mal ships none"):
        timm.create_model("arm_micro", pretrained=True)


def test_import_mal_after_timm_registers_by_itself(tmp_path):
    folder = mal.save_model(mal.create_model("mal_micro", num_classes=5), tmp_path / "m")
    code = f"import timm, mal; m = timm.create_model('local-dir:{folder}', pretrained=True); print(m.num_classes)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "5"
