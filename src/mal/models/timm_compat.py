"""The registered models as timm models: ``timm.create_model("local-dir:<a mal.save_model folder>")`` (or
``hf-hub:ORG/NAME``) builds the saved model with its weights, and ``timm.create_model("mal_tiny")`` a fresh one.

timm finds a model by the ``architecture`` of the folder's ``config.json`` in its registry (every classifier and
encoder description carries it, with ``num_classes`` and the config as ``model_args``: :func:`mal.models.base.card`),
so mal's names must be registered there first: :func:`register_timm_models` does it, and ``import mal`` calls it by
itself when timm is already imported (``import timm`` first; otherwise call ``mal.register_timm_models()``:
importing timm for every ``import mal`` would cost a second). A name timm already has is left to timm.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import nn

#: Arguments timm's ``create_model`` passes to an entry point that are timm's own, not the model's.
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "pretrained_model_args", "cache_dir", "pretrained_strict")

_registered: set[str] = set()


def _weights_of(pretrained_cfg: Any) -> str | None:
    """Where timm's resolved ``pretrained_cfg`` says the weights are: a local folder or ``hf-hub:ID``."""
    get = pretrained_cfg.get if isinstance(pretrained_cfg, dict) else lambda k: getattr(pretrained_cfg, k, None)
    if pretrained_cfg is None:
        return None
    if get("source") == "local-dir" and get("file"):
        return str(get("file"))
    if get("hf_hub_id"):
        return f"hf-hub:{get('hf_hub_id')}"
    return None


def _entry_point(name: str) -> Callable[..., nn.Module]:
    def build(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        from mal.models.factory import create_model

        pretrained_cfg = kwargs.get("pretrained_cfg")
        for key in _TIMM_ONLY:
            kwargs.pop(key, None)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        weights = _weights_of(pretrained_cfg) if pretrained else None
        if pretrained and weights is None:
            raise RuntimeError(f"no weights for {name}: mal ships none; load a saved folder ('local-dir:PATH')")
        return create_model(name if weights is None else None, pretrained=weights, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"mal's {name} (see mal.list_models); timm passes its options to mal.create_model."
    return build


def register_timm_models() -> list[str]:
    """Register every model of :func:`mal.list_models` with timm (once; names timm has are skipped). Returns the
    names registered now. ``ImportError`` without timm."""
    from timm.models import is_model, register_model

    from mal.models.registry import list_models

    new = []
    for name in list_models():
        if name in _registered or is_model(name):
            continue
        fn = _entry_point(name)
        setattr(sys.modules[__name__], name, fn)
        register_model(fn)
        _registered.add(name)
        new.append(name)
    return new


__all__ = ["register_timm_models"]
