"""Building models: from a registered name (``create_model`` / ``create_encoder``), from the description saved with
weights (``config.json`` / safetensors metadata: :func:`model_from_card`), or both (``pretrained=PATH``: the
weights' own architecture and layout, with a new head or input channels where asked, as timm's ``pretrained``).

Weights on disk (:func:`find_weights`): a ``.safetensors`` file, a folder with ``model.safetensors`` (a model saved
by :func:`save_model`, or a training checkpoint ``step_*``), a run folder or its ``checkpoints`` folder (the latest
checkpoint). The description is ``config.json`` beside the weights, else the ``mal_config`` metadata of the file.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mal.config import from_dict
from mal.io import (
    CONFIG_NAME,
    METADATA_KEY,
    WEIGHTS_NAME,
    read_safetensors,
    read_weights_card,
    resolve_checkpoint,
    write_weights,
)
from mal.models.base import CARD_FORMAT, LAYOUT_KEY, EncoderConfig, layouts_match
from mal.models.registry import FAMILIES, Family, apply_overrides, family_of, is_registered, model_config

#: Config fields a model built from weights may change freely: input size and channels, classes and head, drop path,
#: the kernel backend. Any other architecture field must equal the weights'.
FREE_FIELDS = ("image_size", "in_chans", "num_classes", "head_norm", "legacy_norm", "pool", "drop_path_rate",
               "drop_path_decay", "backend", "chunk_size")  # fmt: skip
#: ``pretrained_cfg`` entries a model built from weights takes from them: the data's normalization, the preset name.
CARRIED = ("mean", "std", "architecture")
#: Fields that decide the head's shape: the weights' head is kept only when they are unchanged.
HEAD_FIELDS = ("num_classes", "head_norm", "legacy_norm", "pool")


# ----------------------------------------------------------------------------------------------------------------
# weights on disk
# ----------------------------------------------------------------------------------------------------------------


def find_weights(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(weights file, description)`` of a model on disk (see the module docstring). Raises ``FileNotFoundError``
    when there are no weights and ``ValueError`` when they carry no description (written before mal 0.2)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors file or a folder (a saved model, checkpoint or run)")
        file = path
    elif path.is_dir():
        file = resolve_checkpoint(path) / WEIGHTS_NAME
    else:
        raise FileNotFoundError(f"no model at {path}")
    return file, read_card(file)


def read_card(weights: Path) -> dict[str, Any]:
    """The description of a weights file (:func:`mal.io.read_weights_card`), checked to be a mal model's."""
    card = read_weights_card(weights)
    if card is None:
        raise ValueError(
            f"{weights} carries no model description (no {CONFIG_NAME} beside it, no '{METADATA_KEY}' metadata): "
            "it was written by an older mal or another library; build the model yourself and load_state_dict it"
        )
    if card.get("format") != CARD_FORMAT:
        raise ValueError(f"{weights}: the model description is not a {CARD_FORMAT!r} description")
    return card


def save_model(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model`` as ``folder/config.json`` + ``folder/model.safetensors`` (the Hugging Face Hub layout; the
    description is also in the safetensors metadata). The folder is written next to its final place and renamed
    into it, replacing an earlier save. Read it back with :func:`mal.load_model` or ``create_model(pretrained=)``."""
    if not hasattr(model, "mal_card"):
        raise ValueError(f"{type(model).__name__} is not a mal model (it has no mal_card())")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.saving")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_weights(tmp, model.state_dict(), model.mal_card())
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ----------------------------------------------------------------------------------------------------------------
# descriptions -> models
# ----------------------------------------------------------------------------------------------------------------


def config_from_card(card: dict[str, Any]) -> tuple[Family, EncoderConfig]:
    """The family and encoder config a description names."""
    family = FAMILIES.get(card.get("family", ""))
    if family is None:
        raise ValueError(f"unknown model family {card.get('family')!r} in the model description")
    return family, from_dict(family.config, card.get("config", {}), where="model description config")


def model_from_card(card: dict[str, Any], *, encoder_only: bool = False) -> nn.Module:
    """The classifier (``kind: classifier``) or encoder (``encoder``; also ``encoder_only=True``) a description
    names, with fresh weights and its ``pretrained_cfg``. Higher-level kinds are built by :func:`mal.load_model`."""
    family, cfg = config_from_card(card)
    kind = card.get("kind")
    if kind == "classifier" and not encoder_only:
        model = family.classifier(cfg)
        enc = model.encoder
    elif kind == "encoder" or encoder_only:
        model = enc = family.encoder(dataclasses.replace(cfg, num_classes=0))
    else:
        raise ValueError(f"a {kind!r} model is built by mal.load_model, not model_from_card")
    enc.pretrained_cfg.update({k: v for k, v in card.get("pretrained_cfg", {}).items() if k in CARRIED})
    return model


def inherit_config(
    card: dict[str, Any], name: str | None, overrides: dict[str, Any], *, allow_layout_change: bool = False
) -> tuple[Family, EncoderConfig]:
    """The config of a model built on the weights described by ``card``: their architecture and layout, with
    ``overrides`` of :data:`FREE_FIELDS` applied. ``name`` (optional) must be a model of the same family and
    architecture. An override of another field must equal the weights'; a ``layout`` override must give the same
    token order unless ``allow_layout_change`` (an ablation that fine-tunes in another order)."""
    family, saved = config_from_card(card)
    if name is not None:
        named = family_of(name)
        if named is not family:
            raise ValueError(f"the weights are a {family.name.upper()} model but {name!r} is a {named.name.upper()}")
        built_from = card.get("pretrained_cfg", {}).get("architecture")
        preset = model_config(name)
        arch = [f.name for f in dataclasses.fields(saved) if f.name not in (*FREE_FIELDS, "layout")]
        diff = [f"{k}={getattr(saved, k)!r} (model {name!r}: {getattr(preset, k)!r})"
                for k in arch if getattr(saved, k) != getattr(preset, k)]  # fmt: skip
        if diff and built_from != name:  # weights of a variant of `name` (its overrides) are fine
            raise ValueError(f"the weights do not have the architecture of {name!r}: {', '.join(diff)}")
    fixed = {k: v for k, v in overrides.items() if k not in FREE_FIELDS and k != "layout"}
    built = apply_overrides(saved, overrides, "a model built from weights")
    clash = [
        f"{k}={v!r} (weights: {getattr(saved, k)!r})"
        for k, v in fixed.items()
        if getattr(built, k) != getattr(saved, k)
    ]
    if clash:
        raise ValueError(f"options that contradict the weights' architecture: {', '.join(clash)}")
    changed = not layouts_match(built.layout, saved.layout, built.grid, built.depth)
    if "layout" in overrides and not allow_layout_change and changed:
        raise ValueError(
            f"the layout asked for [{built.layout.describe(built.grid)}] differs from the weights' "
            f"[{saved.layout.describe()}]; fine-tuning in another token order than the pretraining is an "
            "ablation: say so with allow_layout_change (model.allow_layout_change=true)"
        )
    if "layout" not in overrides or not allow_layout_change:
        built = dataclasses.replace(built, layout=saved.layout)  # the weights' own layout, with its grid
    return family, built


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A patch-embedding kernel ``(D, C, p, p)`` for ``in_chans`` input channels, as timm's ``adapt_input_conv``: one
    channel sums the RGB kernels; more channels repeat them, scaled by ``C / in_chans`` to keep the output's scale."""
    c = weight.shape[1]
    if in_chans == c:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // c)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (c / in_chans)


def load_weights_into(
    model: nn.Module,
    weights: Path | dict[str, torch.Tensor],
    card: dict[str, Any],
    *,
    allow_layout_change: bool = False,
) -> dict[str, Any]:
    """Load the encoder (and, when it fits, the head) of saved weights into a classifier or encoder built by
    :func:`inherit_config`. The encoder must match exactly (its input channels adapted when they differ);
    anything else in the file (a pretraining decoder, a dense head, another head) is left out and counted.
    Returns ``{"loaded", "dropped", "new_head"}``."""
    state = read_safetensors(weights) if isinstance(weights, Path) else dict(weights)
    is_classifier = hasattr(model, "encoder")
    encoder = model.encoder if is_classifier else model
    if card.get("kind") == "encoder":
        enc = dict(state)
    else:
        enc = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    loaded = len(enc)
    if allow_layout_change:
        enc.pop(LAYOUT_KEY, None)
    proj = "patch_embed.proj.weight"
    if proj in enc:
        enc[proj] = adapt_input_conv(enc[proj], encoder.cfg.in_chans)
    result = encoder.load_state_dict(enc, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"the weights' encoder does not fit the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    new_head = is_classifier and model.cfg.num_classes > 0
    if is_classifier and card.get("kind") == "classifier":
        _, saved = config_from_card(card)
        rest = {k: v for k, v in state.items() if not k.startswith("encoder.")}
        own = {k for k in model.state_dict() if not k.startswith("encoder.")}
        if all(getattr(saved, k, None) == getattr(model.cfg, k, None) for k in HEAD_FIELDS) and set(rest) == own:
            model.load_state_dict(rest, strict=False)  # the keys were compared just above
            loaded, new_head = loaded + len(rest), False
    return {"loaded": loaded, "dropped": len(state) - loaded, "new_head": new_head}


def _build_pretrained(
    name: str | None, pretrained: str | Path, overrides: dict[str, Any], encoder_only: bool, allow_layout_change: bool
) -> nn.Module:
    file, card = find_weights(pretrained)
    if card.get("kind") not in ("classifier", "encoder", "pretrainer", "dense"):
        raise ValueError(f"{file}: unknown model kind {card.get('kind')!r}")
    if encoder_only:
        overrides = {"num_classes": 0, **overrides}
    family, cfg = inherit_config(card, name, overrides, allow_layout_change=allow_layout_change)
    model = family.encoder(cfg) if encoder_only else family.classifier(cfg)
    enc = model if encoder_only else model.encoder
    enc.pretrained_cfg.update({k: v for k, v in card.get("pretrained_cfg", {}).items() if k in CARRIED})
    model.load_report = load_weights_into(model, file, card, allow_layout_change=allow_layout_change)
    return model


def create_model(
    name: str | Path | None, *, pretrained: str | Path | None = None, allow_layout_change: bool = False,
    features_only: bool = False, out_indices: int | tuple[int, ...] = (-1,), **overrides: Any,
) -> nn.Module:  # fmt: skip
    """Build a registered model with its classification head, e.g. ``create_model("vil_tiny", num_classes=10)``.

    ``name`` may also be weights on disk (a run, checkpoint or saved-model folder): ``create_model("runs/x")`` is
    ``create_model(None, pretrained="runs/x")``. ``pretrained``: weights on disk (see :func:`find_weights`): the
    model takes their architecture and layout and loads them, with a new head when ``num_classes`` (or the head's
    form) differs, and the patch embedding adapted when ``in_chans`` differs (timm's convention). ``layout``
    overrides merge into the preset's layout (a mapping of :class:`~mal.tokens.LayoutConfig` fields).
    ``model.load_report`` says what was loaded.

    ``features_only=True`` (timm's): the encoder alone as a :class:`~mal.models.features.FeatureEncoder` giving the
    raster feature maps ``(B, D, H / p, W / p)`` of the layers ``out_indices`` (an int ``n``: the last ``n``), for
    inputs of any size.
    """
    if name is not None and not is_registered(str(name)) and Path(name).exists():
        name, pretrained = None, name
    if features_only:
        from mal.models.features import FeatureEncoder

        return FeatureEncoder(
            create_encoder(name, pretrained=pretrained, allow_layout_change=allow_layout_change, **overrides),
            out_indices,
        )
    if pretrained is not None:
        return _build_pretrained(name, pretrained, overrides, False, allow_layout_change)
    model = family_of(name).classifier(model_config(name, **overrides))
    model.encoder.pretrained_cfg["architecture"] = name
    return model


def create_encoder(
    name: str, *, pretrained: str | Path | None = None, allow_layout_change: bool = False, **overrides: Any
) -> nn.Module:
    """Build the encoder of a registered model (no head): ``forward(x, mode) -> (B, L, D)``; ``pretrained`` as in
    :func:`create_model`."""
    if pretrained is not None:
        return _build_pretrained(name, pretrained, overrides, True, allow_layout_change)
    model = family_of(name).encoder(model_config(name, **{"num_classes": 0, **overrides}))
    model.pretrained_cfg["architecture"] = name
    return model


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "adapt_input_conv",
    "config_from_card",
    "create_encoder",
    "create_model",
    "find_weights",
    "inherit_config",
    "load_weights_into",
    "model_from_card",
    "read_card",
    "save_model",
]
