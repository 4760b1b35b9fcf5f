"""Multi-task pretraining, MAL-v1's stage 2: ``L = L_AR + depth_weight * L_depth + seg_weight * L_seg``.

The autoregressive part is :class:`~mal.pretrain.MALPretrainer` unchanged (cluster-causal ``pretrain`` pass);
the dense losses come from a second, ``finetune``-mode (bidirectional, unmasked) pass of the same encoder through
one linear per-token head per task (``p*p*out`` values per token, un-patchified to full resolution). A sample
without a depth map (all zeros) or without a mask (all 255) contributes nothing to that loss. Why a second pass:
docs/DESIGN.md, 'Multi-task pretraining'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mal.config import to_dict
from mal.models.heads import LinearDenseHead, encoder_grid
from mal.pretrain.objective import MALPretrainer, ObjectiveConfig, pretrainer_card
from mal.tasks.depth import depth_loss, depth_output_bias
from mal.tasks.segmentation import seg_loss
from mal.tokens import Scan


def _at(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``pred (B, C, h, w)`` at the resolution of ``label (B, H, W)`` (bilinear, as the dense evaluation)."""
    if pred.shape[-2:] == label.shape[-2:]:
        return pred
    return F.interpolate(pred, size=tuple(label.shape[-2:]), mode="bilinear", align_corners=False)


#: State-dict prefixes of the dense heads (stage 2 adds them to a stage-1 model).
PRETRAIN_HEADS = ("depth_head.", "seg_head.")


@dataclass
class MultiTaskSettings:
    """Weights of the dense losses (0 turns a task off; both 0 is plain autoregressive pretraining)."""

    depth_weight: float = 0.0
    seg_weight: float = 0.0
    log_depth: bool = False  # depth loss on log-metres instead of metres

    def validate(self) -> None:
        if self.depth_weight < 0 or self.seg_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got {self.depth_weight}, {self.seg_weight}")

    @property
    def enabled(self) -> bool:
        return self.depth_weight > 0 or self.seg_weight > 0


class MultiTaskPretrainer(MALPretrainer):
    """:class:`MALPretrainer` + linear depth / segmentation heads on a ``finetune``-mode pass.

    ``forward(images (B, C, H, W), depth (B, H, W) | None, mask (B, H, W) | None, scan=None, generator=None)``
    returns the autoregressive outputs of :class:`MALPretrainer` with ``loss`` the weighted sum and ``ar_loss``,
    ``depth_loss``, ``seg_loss`` (the unweighted parts; 0 for a task that is off or has no labels in the batch).
    """

    def __init__(
        self,
        encoder: nn.Module,
        cfg: ObjectiveConfig | None = None,
        *,
        tasks: MultiTaskSettings,
        num_classes: int,
        depth_init: float = 5.0,
    ) -> None:
        """``depth_init``: a typical depth of the data in metres, the depth head's initial output."""
        super().__init__(encoder, cfg)
        self.tasks = tasks
        dim, p = encoder.cfg.dim, encoder.cfg.patch_size
        self.depth_head = LinearDenseHead(dim, p, 1) if tasks.depth_weight > 0 else None
        if self.depth_head is not None:
            with torch.no_grad():
                self.depth_head.proj.bias.fill_(depth_output_bias(depth_init, log=tasks.log_depth))
        self.seg_head = LinearDenseHead(dim, p, num_classes) if tasks.seg_weight > 0 else None
        self.num_classes, self.depth_init = num_classes, depth_init

    def mal_card(self) -> dict:
        """The description saved with the weights: a pretrainer's, with the dense heads' settings."""
        dense = {**to_dict(self.tasks), "num_classes": self.num_classes, "depth_init": self.depth_init}
        return pretrainer_card(self, multitask=dense)

    def forward_dense(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``finetune``-mode pass -> ``depth (B, 1, H, W)`` and/or ``seg (B, K, H, W)`` predictions."""
        grid = self.encoder.patch_embed.grid(images)
        x = encoder_grid(self.encoder, self.encoder(images, mode="finetune"), grid)  # (B, D, gh, gw)
        out = {}
        if self.depth_head is not None:
            out["depth"] = self.depth_head(x)
        if self.seg_head is not None:
            out["seg"] = self.seg_head(x)
        return out

    def forward(
        self,
        images: torch.Tensor,
        depth: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        scan: Scan | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor | Scan]:
        out = super().forward(images, scan, generator)
        ar = out["loss"]
        zero = ar.new_zeros(())
        d_loss = s_loss = zero
        if self.tasks.enabled:
            dense = self.forward_dense(images)
            # a batch without a label kind (e.g. the image-only reconstruction plots) adds nothing for it; labels at
            # another resolution than the input (evaluation keeps theirs) are compared with upsampled predictions
            if "depth" in dense and depth is not None:
                d_loss = depth_loss(_at(dense["depth"], depth), depth, log=self.tasks.log_depth)
            if "seg" in dense and mask is not None:
                s_loss = seg_loss(_at(dense["seg"], mask), mask)
            out["dense"] = dense
        out["loss"] = ar + self.tasks.depth_weight * d_loss + self.tasks.seg_weight * s_loss
        out.update(ar_loss=ar.detach(), depth_loss=d_loss.detach(), seg_loss=s_loss.detach())
        return out
