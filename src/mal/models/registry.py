"""Model registry: named presets of dataclass configs, built with ``create_model`` / ``create_encoder``."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from mal.models.vil import ViLClassifier, ViLConfig, ViLEncoder
from mal.models.vit import ViTClassifier, ViTConfig, ViTEncoder

# name -> (config class, preset fields, classifier builder, encoder builder)
_REGISTRY: dict[str, tuple[type, dict[str, Any], Callable[[Any], nn.Module], Callable[[Any], nn.Module]]] = {}


def register(name: str, config_cls: type, preset: dict[str, Any], classifier: Callable, encoder: Callable) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = (config_cls, dict(preset), classifier, encoder)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_config(name: str, **overrides: Any):
    """The resolved dataclass config of a registered model with ``overrides`` applied."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; available models: {', '.join(list_models())}")
    config_cls, preset, _, _ = _REGISTRY[name]
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for model {name!r}; valid: {', '.join(sorted(valid))}"
        )
    return config_cls(**{**preset, **overrides})


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model with its classification head, e.g. ``create_model("vil_tiny", num_classes=10)``."""
    cfg = model_config(name, **overrides)
    return _REGISTRY[name][2](cfg)


def create_encoder(name: str, **overrides: Any) -> nn.Module:
    """Build the encoder of a registered model (no head): ``forward(x, mode) -> (B, L, D)``."""
    cfg = model_config(name, **{"num_classes": 0, **overrides})
    return _REGISTRY[name][3](cfg)


# ViL sizes (ViL paper Table 10; 12 pairs = 24 blocks) and a micro size for CPU work.
VIL_SIZES = {
    "micro": dict(dim=96, depth=4),
    "tiny": dict(dim=192, depth=12),
    "small": dict(dim=384, depth=12),
    "base": dict(dim=768, depth=12),
}
# MAL: the same encoders with the paper's pretraining layout (4x4 clusters at 192 px, alternating schedule).
MAL_LAYOUT = dict(image_size=192, cluster_size=4, cluster_order="row", scan_schedule="alternating")
MAL_MICRO_LAYOUT = dict(image_size=32, patch_size=4, cluster_size=2, cluster_order="row", scan_schedule="alternating")

for _size, _preset in VIL_SIZES.items():
    register(f"vil_{_size}", ViLConfig, _preset, ViLClassifier, ViLEncoder)
    _layout = MAL_MICRO_LAYOUT if _size == "micro" else MAL_LAYOUT
    register(f"mal_{_size}", ViLConfig, {**_preset, **_layout}, ViLClassifier, ViLEncoder)

# ViT baselines of the same sizes (a block ~ a ViL pair in parameters; ViT-T/S/B heads 3/6/12) with the MAL layout,
# for cluster-causal / MAE pretraining in the same framework (MAL-v2 Table 4).
VIT_SIZES = {
    "micro": dict(dim=96, depth=4, num_heads=3),
    "tiny": dict(dim=192, depth=12, num_heads=3),
    "small": dict(dim=384, depth=12, num_heads=6),
    "base": dict(dim=768, depth=12, num_heads=12),
}
for _size, _preset in VIT_SIZES.items():
    _layout = MAL_MICRO_LAYOUT if _size == "micro" else MAL_LAYOUT
    register(f"vit_{_size}", ViTConfig, {**_preset, **_layout, "scan_schedule": "fixed:row"}, ViTClassifier, ViTEncoder)
