"""Building models: from a registered name (``create_model`` / ``create_encoder``), from the description saved with
weights (``config.json`` / safetensors metadata: :func:`model_from_card`), or both (``pretrained=PATH``: the
weights' own architecture and layout, with a new head or input channels where asked, as timm's ``pretrained``).

Weights on disk (:func:`find_weights`): a ``.safetensors`` file, a folder with ``model.safetensors`` (a model saved
by :func:`save_model`, or a training checkpoint ``step_*``), a run folder or its ``checkpoints`` folder (the latest
checkpoint). The description is ``config.json`` beside the weights, else the ``mal_config`` metadata of the file.
Weights on the Hugging Face Hub are named ``hf-hub:ORG/NAME[@REVISION]`` (timm's spelling, :func:`hub_weights`): their
``config.json`` + ``model.safetensors`` are downloaded into the Hub's cache, then read like a saved folder.
:func:`save_model` also writes a model card (``README.md``, :func:`model_card`), the page the Hub shows.
"""

from __future__ import annotations

import dataclasses
import json
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
    atomic_write,
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
#: How a model on the Hugging Face Hub is named: ``hf-hub:ORG/NAME`` or ``hf-hub:ORG/NAME@REVISION`` (timm's form).
HUB_PREFIX = "hf-hub:"
#: The model card :func:`save_model` writes beside the weights (the page the Hub shows for a repo).
CARD_NAME = "README.md"
#: The licence the model card declares: the repository's (LICENSE: MIT).
CARD_LICENSE = "mit"


# ----------------------------------------------------------------------------------------------------------------
# weights on disk
# ----------------------------------------------------------------------------------------------------------------


def find_weights(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(weights file, description)`` of a model on disk or on the Hub (``hf-hub:ORG/NAME[@REVISION]``, see the
    module docstring). Raises ``FileNotFoundError`` when there are no weights and ``ValueError`` when they carry no
    description (written before mal 0.2)."""
    if is_hub_name(path):
        path = hub_weights(str(path))
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


def save_model(
    model: nn.Module, folder: str | Path, *, metrics: dict[str, Any] | None = None, repo_id: str | None = None
) -> Path:
    """Write ``model`` as ``folder/config.json`` + ``folder/model.safetensors`` (the Hugging Face Hub layout; the
    description is also in the safetensors metadata) and its model card ``folder/README.md`` (:func:`model_card`:
    ``metrics``, e.g. ``{"top1": 81.2}``, go into it; ``repo_id``: the Hub repo its loading lines name, else the
    folder). The folder is written next to its final place and renamed into it, replacing an earlier save. Read it
    back with :func:`mal.load_model` or ``create_model(pretrained=)``."""
    if not hasattr(model, "mal_card"):
        raise ValueError(f"{type(model).__name__} is not a mal model (it has no mal_card())")
    folder = Path(folder)
    card = model.mal_card()
    text = model_card(
        card,
        num_params=sum(p.numel() for p in model.parameters()),
        metrics=metrics,
        source=f"{HUB_PREFIX}{repo_id}" if repo_id else folder.as_posix(),
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.saving")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_weights(tmp, model.state_dict(), card)
        atomic_write(tmp / CARD_NAME, lambda f: f.write(text))
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
# weights on the Hugging Face Hub
# ----------------------------------------------------------------------------------------------------------------


def is_hub_name(name: str | Path | None) -> bool:
    """Whether ``name`` names a model on the Hugging Face Hub (``hf-hub:ORG/NAME[@REVISION]``)."""
    return name is not None and str(name).startswith(HUB_PREFIX)


def import_huggingface_hub() -> Any:
    """The ``huggingface_hub`` module; ``ImportError`` with the install line when it is not installed (an extra)."""
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(
            "models on the Hugging Face Hub need the huggingface_hub package: pip install 'mal-vision[hub]'"
        ) from None
    return huggingface_hub


def hub_weights(name: str) -> Path:
    """The local ``model.safetensors`` (``config.json`` beside it) of the Hub model ``hf-hub:ORG/NAME[@REVISION]``:
    both files of one commit, downloaded into the Hub's cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``) or found
    there; with ``HF_HUB_OFFLINE=1`` only the cache is read. ``FileNotFoundError`` naming the repo when it (or a
    revision or file of it) is neither on the Hub nor in the cache."""
    repo_id, _, revision = name.removeprefix(HUB_PREFIX).partition("@")
    if not repo_id:
        raise ValueError(f"{name!r}: expected {HUB_PREFIX}ORG/NAME or {HUB_PREFIX}ORG/NAME@REVISION")
    hub = import_huggingface_hub()
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = Path(
            hub.snapshot_download(repo_id, revision=revision or None, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
        )
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"the Hugging Face Hub repo {repo_id!r} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:  # also gated repos: the Hub answers 401/404 alike without a token
        raise FileNotFoundError(
            f"no model repo {repo_id!r} on the Hugging Face Hub (a private or gated one needs a token: hf auth login)"
        ) from e
    except (LocalEntryNotFoundError, EntryNotFoundError) as e:
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise FileNotFoundError(
            f"the Hugging Face Hub model {repo_id!r}{at} is not in the cache ({constants.HF_HUB_CACHE}) and {why}"
        ) from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"the Hugging Face Hub model {repo_id!r}{at} could not be downloaded ({e})") from e
    missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the Hugging Face Hub model {repo_id!r}{at} has no {' and no '.join(missing)} (not a mal model, or "
            "not fully in the cache)"
        )
    return folder / WEIGHTS_NAME


# ----------------------------------------------------------------------------------------------------------------
# model cards
# ----------------------------------------------------------------------------------------------------------------

#: Names of the families in prose (a family missing here is named by its key).
FAMILY_NAMES = {"vil": "Vision-LSTM (ViL)", "vit": "ViT", "vim": "Vision Mamba (Vim)", "arm": "ARM (Mamba)"}
#: Each kind of model in prose, and what ``model(x)`` gives (of the model :func:`mal.load_model` returns: a
#: pretraining model's encoder).
KINDS = {
    "classifier": ("classifier", "x: (B, C, H, W) images -> (B, num_classes) logits"),
    "encoder": ("encoder (no head)", "x: (B, C, H, W) images -> (B, L, D) tokens"),
    "pretrainer": ("pretraining model (encoder and decoder)", "the encoder: (B, C, H, W) images -> (B, L, D) tokens"),
    "dense": ("dense-prediction model", "x: (B, C, H, W) images -> {'out': (B, K, H, W), 'aux': ...}"),
    "detector": ("detector", "x: a list of (C, H, W) images -> a list of {'boxes', 'labels', 'scores', ...}"),
}


def model_card(card: dict[str, Any], *, num_params: int, source: str, metrics: dict[str, Any] | None = None) -> str:
    """The model card (``README.md``) of a model with description ``card`` and ``num_params`` parameters: YAML
    front matter (library, licence, tags), what the model is (kind, family, size, layout), its ``metrics`` when
    given, three lines that load it from ``source`` (``hf-hub:ORG/NAME`` or a folder), its config as JSON, the
    licence."""
    import yaml

    family, cfg = config_from_card(card)
    kind = card.get("kind", "?")
    noun, output = KINDS.get(kind, (f"{kind} model", f"see {CONFIG_NAME}"))
    pre = card.get("pretrained_cfg", {})
    front = {"library_name": "mal", "license": CARD_LICENSE,
             "tags": ["image-classification" if kind == "classifier" else kind, "mal", family.name]}  # fmt: skip
    size = cfg.image_size if isinstance(cfg.image_size, int) else "x".join(map(str, cfg.image_size))
    gh, gw = cfg.grid
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {pre.get('architecture') or f'{family.name} {kind}'}",
        "",
        f"A {FAMILY_NAMES.get(family.name, family.name)} {noun} saved by mal {card.get('mal_version', '')}: "
        f"{num_params / 1e6:.2f}M parameters ({num_params:,}).",
        "",
        f"- width {cfg.dim}, depth {cfg.depth}, patch size {cfg.patch_size}, image size {size} ({gh}x{gw} patches), "
        f"{cfg.in_chans} input channels" + (f", {cfg.num_classes} classes" if kind == "classifier" else ""),
        f"- token layout: {cfg.layout.describe(cfg.grid)}",
    ]
    if "mean" in pre and "std" in pre:
        lines.append(f"- input normalization: mean {pre['mean']}, std {pre['std']}")
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import mal",
        f"model = mal.load_model({json.dumps(source)})  # in eval mode",
        f"out = model(x)  # {output}",
        "```",
        "",
        "## Config",
        "",
        f"The model's config (the whole description, which `mal.load_model` reads, is `{CONFIG_NAME}`):",
        "",
        "```json",
        json.dumps(card.get("config", {}), indent=2),
        "```",
        "",
        "## License",
        "",
        f"{CARD_LICENSE.upper()}, as the mal library.",
        "",
    ]
    return "\n".join(lines)


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
    saved = card.get("pretrained_cfg", {})
    enc.pretrained_cfg.update({k: v for k, v in saved.items() if k in CARRIED})
    # the exact model's own: its run's evaluation crop, and the class names of its head (a classifier's, or the
    # dense head a dense model builds on this encoder)
    own = ("crop_pct", "label_names") if kind == "dense" or model is not enc else ("crop_pct",)
    enc.pretrained_cfg.update({k: saved[k] for k in own if saved.get(k) is not None})
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

    ``name`` may also be weights on disk (a run, checkpoint or saved-model folder) or on the Hub
    (``hf-hub:ORG/NAME``): ``create_model("runs/x")`` is ``create_model(None, pretrained="runs/x")``.
    ``pretrained``: weights on disk or the Hub (see :func:`find_weights`): the
    model takes their architecture and layout and loads them, with a new head when ``num_classes`` (or the head's
    form) differs, and the patch embedding adapted when ``in_chans`` differs (timm's convention). ``layout``
    overrides merge into the preset's layout (a mapping of :class:`~mal.tokens.LayoutConfig` fields).
    ``model.load_report`` says what was loaded.

    ``features_only=True`` (timm's): the encoder alone as a :class:`~mal.models.features.FeatureEncoder` giving the
    raster feature maps ``(B, D, H / p, W / p)`` of the layers ``out_indices`` (an int ``n``: the last ``n``), for
    inputs of any size.
    """
    if is_hub_name(name) or (name is not None and not is_registered(str(name)) and Path(name).exists()):
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
    :func:`create_model` (``name`` may be ``hf-hub:ORG/NAME`` too)."""
    if is_hub_name(name):
        name, pretrained = None, name
    if pretrained is not None:
        return _build_pretrained(name, pretrained, overrides, True, allow_layout_change)
    model = family_of(name).encoder(model_config(name, **{"num_classes": 0, **overrides}))
    model.pretrained_cfg["architecture"] = name
    return model


__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "HUB_PREFIX",
    "WEIGHTS_NAME",
    "adapt_input_conv",
    "config_from_card",
    "create_encoder",
    "create_model",
    "find_weights",
    "hub_weights",
    "import_huggingface_hub",
    "inherit_config",
    "is_hub_name",
    "load_weights_into",
    "model_card",
    "model_from_card",
    "read_card",
    "save_model",
]
