"""Load weights of the official NX-AI ``VisionLSTM2`` (the reference ViL implementation) into our model."""

from __future__ import annotations

import re

import torch

from mal.models.vil import ViLClassifier, ViLConfig

_BLOCK = re.compile(r"^blocks\.(\d+)\.(rowwise_from_top_left|rowwise_from_bot_right)\.(.+)$")
_DIRECTION = {"rowwise_from_top_left": "fwd", "rowwise_from_bot_right": "bwd"}


def _map_key(key: str) -> str:
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


def vil_from_official(
    state_dict: dict[str, torch.Tensor],
    *,
    image_size: int | tuple[int, int],
    patch_size: int,
    num_classes: int,
    legacy_norm: bool = False,
    **overrides,
) -> ViLClassifier:
    """Build a :class:`ViLClassifier` from an official ``VisionLSTM2`` state dict.

    Width, depth and channels are read from the weights; the position embedding is resized (bicubic) when
    ``image_size`` gives another grid than the checkpoint's. Every key must map, and every parameter of ours must
    be filled (strict). Returns the model in eval mode.
    """
    try:
        w = state_dict["patch_embed.proj.weight"]  # (D, C, p, p)
    except KeyError:
        raise ValueError("not an official VisionLSTM2 state dict: 'patch_embed.proj.weight' is missing") from None
    if w.shape[-1] != patch_size:
        raise ValueError(
            f"patch_size={patch_size} but the checkpoint's patch embedding has kernel {tuple(w.shape[2:])}"
        )
    depth = 1 + max(int(m[1]) for k in state_dict if (m := _BLOCK.match(k)))
    cfg = ViLConfig(
        dim=w.shape[0],
        depth=depth,
        image_size=image_size,
        patch_size=patch_size,
        in_chans=w.shape[1],
        num_classes=num_classes,
        legacy_norm=legacy_norm,
        norm_bias="norm.bias" in state_dict,
        proj_bias="blocks.0.rowwise_from_top_left.layer.proj_up.bias" in state_dict,
        **overrides,
    )
    model = ViLClassifier(cfg)
    mapped = {_map_key(k): v for k, v in state_dict.items()}
    model.load_state_dict(mapped, strict=True)
    return model.eval()
