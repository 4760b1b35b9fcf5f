"""Parameter groups (no weight decay on norms, biases, embeddings, gate biases; layer-wise lr decay), AdamW,
and the per-step warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, *, layer_decay: float | None = None) -> list[dict]:
    """AdamW groups. No weight decay on 1-D parameters (norm weights, biases, gate biases) and on the names in
    ``model.no_weight_decay()`` (position embeddings, learned tokens).

    With ``layer_decay`` the model says how its parameters group into layers (as timm's ``group_matcher``):
    ``model.layer_of(name)`` in ``0 .. model.num_layers + 1`` (0 = the embeddings, ``num_layers + 1`` = the head),
    and a parameter's lr is scaled by ``layer_decay ** (num_layers + 1 - layer)`` (stored as ``lr_scale``).
    Returns groups with ``params``, ``weight_decay``, ``lr_scale`` and ``names``.
    """
    if layer_decay is not None and not hasattr(model, "layer_of"):
        raise ValueError(f"{type(model).__name__} does not group its parameters into layers: no layer decay")
    num_layers = model.num_layers if layer_decay is not None else 0
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in skip
        layer = model.layer_of(name) if layer_decay is not None else num_layers + 1
        scale = layer_decay ** (num_layers + 1 - layer) if layer_decay is not None else 1.0
        g = groups.setdefault(
            (layer, decay),
            {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale},
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    kwargs = {"fused": True} if all(p.is_cuda for g in groups for p in g["params"]) else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **kwargs)


def cosine_lr(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then half-cosine from ``base_lr`` to ``min_lr`` at
    ``total_steps`` (``step`` counts optimizer steps from 0)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
