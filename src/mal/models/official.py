"""Weights of the official NX-AI ``VisionLSTM2`` (the reference ViL implementation) in our model.

NX-AI's published files come as ``.th`` / ``.pth`` (a pickled dict, read with ``weights_only=True``, often
``{"state_dict": ...}``) or ``.safetensors``; width, depth, patch size, channels, classes and the pooling norm are
read from the tensors. Their layout is the plain raster ViL (single-patch clusters, every pair row-major).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from mal.io import read_safetensors
from mal.models.base import LAYOUT_KEY, card, default_pretrained_cfg, layout_record
from mal.models.factory import inherit_config, load_weights_into
from mal.models.vil import ViLClassifier, ViLConfig, ViLEncoder
from mal.tokens import LayoutConfig

_BLOCK = re.compile(r"^blocks\.(\d+)\.(rowwise_from_top_left|rowwise_from_bot_right)\.(.+)$")
_DIRECTION = {"rowwise_from_top_left": "fwd", "rowwise_from_bot_right": "bwd"}
_WRAPPERS = ("state_dict", "model", "module")
#: The official model's token layout: the raster ViL.
OFFICIAL_LAYOUT = LayoutConfig()


def official_key(key: str) -> str:
    """Our name of a key of the official ``VisionLSTM2`` state dict."""
    m = _BLOCK.match(key)
    if m:
        return f"encoder.blocks.{m[1]}.{_DIRECTION[m[2]]}.{m[3]}"
    if key.startswith(("patch_embed.", "norm.")):
        return "encoder." + key
    if key == "pos_embed.embed":
        return "encoder.pos_embed.embed"
    if key.startswith(("head.", "legacy_norm.")):
        return key
    raise ValueError(f"unexpected key {key!r} in the official VisionLSTM2 state dict")


def read_official_state(source: str | Path | dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of official ViL weights: a state dict, a ``{"state_dict": ...}`` (or ``model`` / ``module``)
    wrapper, or a ``.th`` / ``.pth`` / ``.pt`` / ``.safetensors`` file holding one; a one-line ``ValueError``
    otherwise."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"official ViL weights not found: {path}")
        if path.suffix == ".safetensors":
            state: Any = read_safetensors(path)
        elif path.suffix in (".th", ".pth", ".pt", ".bin", ".ckpt"):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 (torch raises many kinds for a bad or unsafe pickle)
                raise ValueError(f"{path}: not readable as weights with torch.load(weights_only=True): {e}") from e
        else:
            raise ValueError(f"{path}: official ViL weights are a .th, .pth, .pt or .safetensors file")
        where = str(path)
    else:
        state, where = source, "the given state dict"
    for _ in range(2):  # e.g. {"state_dict": {"module": ...}} is not a format seen so far, one level is
        if isinstance(state, dict):
            wrapped = [k for k in _WRAPPERS if isinstance(state.get(k), dict)]
            if wrapped and "patch_embed.proj.weight" not in state:
                state = state[wrapped[0]]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where}: not a state dict of tensors (nor a {{'state_dict': ...}} wrapper of one)")
    if "patch_embed.proj.weight" not in state:
        raise ValueError(f"{where}: not an official VisionLSTM2 state dict ('patch_embed.proj.weight' is missing)")
    return dict(state)


def official_config(state: dict[str, torch.Tensor], image_size: int | tuple[int, int] | None = None) -> ViLConfig:
    """The :class:`ViLConfig` of official weights: width, depth, patch size, channels, classes (0 without a head),
    norm and projection biases and the pooling norm, read from the tensors; ``image_size`` defaults to the grid of
    the position embedding."""
    w = state["patch_embed.proj.weight"]  # (D, C, p, p)
    blocks = [int(m[1]) for k in state if (m := _BLOCK.match(k))]
    if not blocks:
        raise ValueError("not an official VisionLSTM2 state dict: it has no blocks.*.rowwise_* keys")
    p = w.shape[-1]
    if image_size is None:
        pos = state.get("pos_embed.embed")
        image_size = (pos.shape[1] * p, pos.shape[2] * p) if pos is not None and pos.ndim == 4 else 224
        if image_size[0] == image_size[1]:
            image_size = image_size[0]
    head = state.get("head.weight")
    return ViLConfig(
        dim=w.shape[0],
        depth=1 + max(blocks),
        image_size=image_size,
        patch_size=p,
        in_chans=w.shape[1],
        num_classes=0 if head is None else head.shape[0],
        legacy_norm="legacy_norm.weight" in state,
        norm_bias="norm.bias" in state,
        proj_bias="blocks.0.rowwise_from_top_left.layer.proj_up.bias" in state,
        layout=OFFICIAL_LAYOUT,
    )


def official_card_and_state(
    source: str | Path | dict[str, Any], image_size: int | tuple[int, int] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Official weights as one of our model descriptions (``kind: classifier``) and a state dict in our key names
    (with the raster layout's record), so that they load like our own files."""
    state = read_official_state(source)
    cfg = official_config(state, image_size)
    mapped = {official_key(k): v for k, v in state.items()}
    mapped[f"encoder.{LAYOUT_KEY}"] = layout_record(cfg.resolved().layout)
    return card("classifier", cfg, default_pretrained_cfg(cfg)), mapped


def vil_from_official(
    source: str | Path | dict[str, Any],
    *,
    image_size: int | tuple[int, int] | None = None,
    patch_size: int | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    encoder_only: bool = False,
    **overrides: Any,
) -> ViLClassifier | ViLEncoder:
    """A :class:`ViLClassifier` (or, ``encoder_only``, its encoder) with official ``VisionLSTM2`` weights, in eval mode.

    ``source``: a state dict, a wrapper of one, or a file (:func:`read_official_state`). Architecture from the
    tensors; ``patch_size``, when given, must agree with them. ``num_classes`` other than the file's gives a new
    head; ``in_chans`` other than the file's adapts the patch embedding (timm's rule); ``image_size`` other than the
    file's resizes the position embedding (bicubic). ``overrides``: other config fields that do not change the
    architecture (``backend``, ``drop_path_rate``, ...). Every tensor must map, and every parameter be filled.
    """
    info, state = official_card_and_state(source)
    saved = info["config"]
    if patch_size is not None and patch_size != saved["patch_size"]:
        raise ValueError(
            f"patch_size={patch_size} but the checkpoint's patch embedding has kernel {saved['patch_size']}"
        )
    asked = {"image_size": image_size, "num_classes": num_classes, "in_chans": in_chans}
    overrides = {**{k: v for k, v in asked.items() if v is not None}, **overrides}
    if encoder_only:
        overrides["num_classes"] = 0
    family, cfg = inherit_config(info, None, overrides)
    model = family.encoder(cfg) if encoder_only else family.classifier(cfg)
    if not encoder_only and cfg.num_classes == saved["num_classes"]:
        own = {k for k in model.state_dict() if not k.startswith("encoder.")}
        theirs = {k for k in state if not k.startswith("encoder.")}
        if own != theirs:  # e.g. a head the architecture does not have: strict, as every key must map
            raise ValueError(f"official weights do not fit the model: {sorted(own ^ theirs)[:5]}")
    model.load_report = load_weights_into(model, state, info)
    return model.eval()
