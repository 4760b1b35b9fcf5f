"""MAL: cluster-masked autoregressive pretraining of Vision-LSTM (xLSTM) backbones.

The public API is imported on first use (``import mal`` alone loads no torch), so that the ``mal`` command starts
fast: ``mal.create_model``, ``mal.create_encoder``, ``mal.list_models``, ``mal.load_model``, ``mal.save_model``,
``mal.vil_from_official``, ``mal.compile_blocks``, ``mal.LayoutConfig``, ``mal.push_to_hub``,
``mal.register_timm_models``.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from mal._version import __version__

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names below load lazily
    from mal.hub import load_model, push_to_hub, save_model
    from mal.models import compile_blocks, create_encoder, create_model, list_models, vil_from_official
    from mal.models.timm_compat import register_timm_models
    from mal.tokens import LayoutConfig

_LAZY = {
    "LayoutConfig": "mal.tokens",
    "compile_blocks": "mal.models",
    "create_encoder": "mal.models",
    "create_model": "mal.models",
    "list_models": "mal.models",
    "load_model": "mal.hub",
    "push_to_hub": "mal.hub",
    "register_timm_models": "mal.models.timm_compat",
    "save_model": "mal.hub",
    "vil_from_official": "mal.models",
}

__all__ = [
    "LayoutConfig",
    "__version__",
    "compile_blocks",
    "create_encoder",
    "create_model",
    "list_models",
    "load_model",
    "push_to_hub",
    "register_timm_models",
    "save_model",
    "vil_from_official",
]


if "timm" in sys.modules:  # timm imported first: mal's models become timm models now (mal.models.timm_compat)
    importlib.import_module("mal.models.timm_compat").register_timm_models()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
