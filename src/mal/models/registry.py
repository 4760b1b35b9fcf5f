"""Model registry: named presets of dataclass configs (``list_models``, ``model_config``). Models are built from
them by :mod:`mal.models.factory` (``create_model`` / ``create_encoder``, with or without weights)."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from mal.config import ConfigError, from_dict, to_dict
from mal.models.base import EncoderConfig
from mal.models.mamba import ARMConfig, MambaClassifier, MambaEncoder, VimConfig
from mal.models.vil import ViLClassifier, ViLConfig, ViLEncoder
from mal.models.vit import ViTClassifier, ViTConfig, ViTEncoder
from mal.tokens import LayoutConfig


@dataclass(frozen=True)
class Family:
    """A model family: its config class and how to build its classifier and its encoder from a config."""

    name: str
    config: type[EncoderConfig]
    classifier: Callable[[Any], nn.Module]
    encoder: Callable[[Any], nn.Module]


FAMILIES = {
    "vil": Family("vil", ViLConfig, ViLClassifier, ViLEncoder),
    "vit": Family("vit", ViTConfig, ViTClassifier, ViTEncoder),
    "vim": Family("vim", VimConfig, MambaClassifier, MambaEncoder),
    "arm": Family("arm", ARMConfig, MambaClassifier, MambaEncoder),
}

# name -> (family, preset fields)
_REGISTRY: dict[str, tuple[Family, dict[str, Any]]] = {}


def register(name: str, family: str, preset: dict[str, Any]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = (FAMILIES[family], dict(preset))


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (``"mal_*"``), sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def is_registered(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _REGISTRY


def family_of(name: str) -> Family:
    """The family of a registered model; a typo lists the valid names."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; available models: {', '.join(list_models())}")
    return _REGISTRY[name][0]


def family_of_config(cfg: EncoderConfig) -> Family:
    for family in FAMILIES.values():
        if type(cfg) is family.config:
            return family
    raise ValueError(f"no model family has the config class {type(cfg).__name__}")


def apply_overrides(cfg: EncoderConfig, overrides: dict[str, Any], what: str) -> EncoderConfig:
    """``cfg`` with ``overrides`` set; ``layout`` (a mapping or a :class:`~mal.tokens.LayoutConfig`) is merged into
    the layout (:meth:`LayoutConfig.merged`). Unknown options raise a ``ValueError`` naming ``what``."""
    if "img_size" in overrides:  # timm's spelling
        if "image_size" in overrides:
            raise ValueError(f"give image_size or img_size (timm's name for it) for {what}, not both")
        overrides = {("image_size" if k == "img_size" else k): v for k, v in overrides.items()}
    valid = {f.name for f in dataclasses.fields(cfg) if f.init}
    layout_fields = {f.name for f in dataclasses.fields(LayoutConfig)}
    misplaced = sorted(k for k in overrides if k in layout_fields and k not in valid)
    if misplaced:
        raise ValueError(
            f"{', '.join(misplaced)}: layout option(s) of {what} go in its layout, e.g. "
            f"layout={{{misplaced[0]!r}: {overrides[misplaced[0]]!r}}} (YAML: model.overrides.layout.{misplaced[0]})"
        )
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {what}; valid: {', '.join(sorted(valid))}")
    changes = dict(overrides)
    if "layout" in changes:
        changes["layout"] = cfg.layout.merged(changes["layout"])
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.init}
    try:  # type-checked like a config file (a width of .inf fails here, not in the build)
        return from_dict(type(cfg), {**fields, **changes})
    except ConfigError as e:
        raise ValueError(f"{what}: {e}") from None


def expand_model_section(config: dict) -> dict:
    """A run config (as a dict) with ``model.overrides`` replaced by every field of the model config they build with
    ``model.name``, so that configs compare as built models (an override equal to the preset's value is no change).
    Configs without a registered ``model.name`` (fine-tuning that takes its model from a checkpoint) are unchanged."""
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or model.get("name") not in _REGISTRY:
        return config
    built = to_dict(model_config(model["name"], **(model.get("overrides") or {})))
    return {**config, "model": {**model, "overrides": built}}


def model_config(name: str, **overrides: Any) -> EncoderConfig:
    """The dataclass config of a registered model with ``overrides`` applied (see :func:`apply_overrides`)."""
    family = family_of(name)
    preset = family.config(**_REGISTRY[name][1])
    return apply_overrides(preset, overrides, f"model {name!r}")


# ViL sizes (ViL paper Table 10; 12 pairs = 24 blocks) and a micro size for CPU work.
VIL_SIZES = {
    "micro": dict(dim=96, depth=4),
    "tiny": dict(dim=192, depth=12),
    "small": dict(dim=384, depth=12),
    "base": dict(dim=768, depth=12),
}
# MAL: the same encoders with the paper's pretraining layout: clusters of 4x4 patches (at 192 px, 3x3 of them) in row
# order, the alternating schedule. A built model records its grid in its layout: run or fine-tuned at another
# resolution it keeps its cluster grid (192 -> 224 px gives 3x3 clusters of 5, 5, 4; docs/DESIGN.md, 'Resolution
# change and the cluster grid'); a model *built* at another resolution tiles it with clusters of 4 (224 px:
# 4, 4, 4, 2).
MAL_LAYOUT = dict(image_size=192, layout=LayoutConfig(cluster_size=4, scan_schedule="alternating"))
# micro: 32 px images of 4 px patches (8x8), clusters of 2x2 patches
MAL_MICRO_LAYOUT = dict(image_size=32, patch_size=4, layout=LayoutConfig(cluster_size=2, scan_schedule="alternating"))

for _size, _preset in VIL_SIZES.items():
    register(f"vil_{_size}", "vil", _preset)
    _layout = MAL_MICRO_LAYOUT if _size == "micro" else MAL_LAYOUT
    register(f"mal_{_size}", "vil", {**_preset, **_layout})

# ViT baselines of the same sizes (a block ~ a ViL pair in parameters; ViT-T/S/B heads 3/6/12) with the MAL layout,
# for cluster-causal / MAE pretraining in the same framework (MAL-v2 Table 4); attention has no scan, so the
# schedule is fixed.
VIT_SIZES = {
    "micro": dict(dim=96, depth=4, num_heads=3),
    "tiny": dict(dim=192, depth=12, num_heads=3),
    "small": dict(dim=384, depth=12, num_heads=6),
    "base": dict(dim=768, depth=12, num_heads=12),
}
for _size, _preset in VIT_SIZES.items():
    _layout = MAL_MICRO_LAYOUT if _size == "micro" else MAL_LAYOUT
    _fixed = dataclasses.replace(_layout["layout"], scan_schedule="fixed:row")
    register(f"vit_{_size}", "vit", {**_preset, **_layout, "layout": _fixed})

# Mamba baselines with the same layout (MAL-v2 Tables 1, 3, 4, 9; the ARM paper). A scan is causal token by token,
# so their pretrain mode is causal inside a cluster (within_cluster="causal"); the order is fixed like ViT's.
# Vim (Vim paper Table 1): 24 blocks of two scans, expand 2; ARM's MambaMLP: ViT's 12 blocks and widths, expand 1,
# four scans in fine-tuning, SwiGLU. Micro sizes for CPU work.
VIM_SIZES = {
    "micro": dict(dim=96, depth=8),
    "tiny": dict(dim=192, depth=24),
    "small": dict(dim=384, depth=24),
    "base": dict(dim=768, depth=24),
}
ARM_SIZES = {
    "micro": dict(dim=96, depth=4),
    "tiny": dict(dim=192, depth=12),
    "small": dict(dim=384, depth=12),
    "base": dict(dim=768, depth=12),
}
for _family, _sizes in (("vim", VIM_SIZES), ("arm", ARM_SIZES)):
    for _size, _preset in _sizes.items():
        _layout = MAL_MICRO_LAYOUT if _size == "micro" else MAL_LAYOUT
        _scan = dataclasses.replace(_layout["layout"], scan_schedule="fixed:row", within_cluster="causal")
        register(f"{_family}_{_size}", _family, {**_preset, **_layout, "layout": _scan})
