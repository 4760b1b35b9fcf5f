"""Cluster-masked autoregressive pretraining: the encoder in ``pretrain`` mode reads the image unit by unit along
the scan; the decoder predicts the (per-patch normalized) pixels of units ``1 .. K-1`` from the memory of strictly
earlier units; mean squared error over every predicted patch (docs/DESIGN.md, 'Pretraining decoder and objective').

``MALPretrainer.forward(images) -> dict`` with ``loss`` (a scalar) and what the reconstruction plots need.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mal.config import to_dict
from mal.pretrain.decoder import tap_schedule
from mal.pretrain.decoders import build_decoder
from mal.tokens import Scan, patchify, serialize, unpatchify, unserialize


@dataclass
class ObjectiveConfig:
    """The pretraining objective; defaults as in docs/DESIGN.md, 'Pretraining decoder and objective' (MAL-v2 Table 12,
    ARM Table 7).

    ``method``: ``ar`` (cluster-masked autoregression, :class:`MALPretrainer`) or ``mae`` (the MAE baseline:
    random ``mask_ratio`` masking, :class:`~mal.pretrain.mae.MAEPretrainer`; the decoder's width, depth, heads and
    MLP ratio apply to its Transformer decoder, ``decoder``, ``memory`` and ``skip_last_unit`` do not apply).

    ``decoder`` (MAL-v2 Table 13, :mod:`mal.pretrain.decoders`): ``transformer`` (attention, the default),
    ``mlstm`` (xLSTM blocks like the encoder's; ``decoder_heads`` mLSTM heads) or ``mamba`` (Mamba blocks;
    ``decoder_heads`` unused). The recurrent decoders count ``decoder_depth`` in block pairs, have no MLP
    (``decoder_mlp_ratio`` unused) and read the last encoder block only (``memory=last``)."""

    method: Literal["ar", "mae"] = "ar"
    mask_ratio: float = 0.75  # mae: fraction of the patches hidden from the encoder
    decoder: Literal["transformer", "mlstm", "mamba", "paper"] = "transformer"
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    memory: Literal["last", "taps"] = "last"  # encoder output, or ARM's four taps (1/2, 2/3, 5/6, 1 of the depth)
    norm_pix: bool = True  # targets normalized per patch
    # the encoder skips the last unit, whose outputs no target needs (exact: the encoder is causal by unit;
    # docs/DESIGN.md, 'Pretraining decoder and objective')
    skip_last_unit: bool = True

    def validate(self) -> None:
        if self.decoder_depth < 1 or self.decoder_dim < 4:
            raise ValueError(f"decoder needs depth >= 1 and width >= 4, got {self.decoder_depth}, {self.decoder_dim}")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.method == "mae" and self.memory != "last":
            raise ValueError("objective.memory=taps is for the autoregressive decoder; method=mae reads the last block")
        if self.method == "mae" and self.decoder != "transformer":
            raise ValueError(
                f"objective.decoder={self.decoder} is for the autoregressive objective; MAE's decoder is a Transformer"
            )
        if self.decoder != "transformer" and self.memory != "last":
            raise ValueError(
                "objective.memory=taps feeds the Transformer decoder's cross-attention; "
                f"the {self.decoder} decoder reads the last encoder block (objective.memory=last)"
            )
        if self.decoder == "mlstm" and (2 * self.decoder_dim) % self.decoder_heads:
            raise ValueError(
                f"the mLSTM decoder's inner width 2 * decoder_dim = {2 * self.decoder_dim} is not divisible by "
                f"decoder_heads = {self.decoder_heads}"
            )


def pretrainer_card(model: nn.Module, multitask: dict | None = None) -> dict:
    """The description of a pretraining model (``encoder`` + decoder of objective ``model.cfg``; ``multitask``: the
    dense heads' settings of multi-task pretraining)."""
    return {**model.encoder.mal_card(), "kind": "pretrainer",
            "pretraining": {"objective": to_dict(model.cfg), "multitask": multitask}}  # fmt: skip


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch pixel normalization ``(x - mean) / sqrt(var + eps)``, unbiased variance (MAE). ``(..., P)``."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


class MALPretrainer(nn.Module):
    """Encoder (``pretrain`` mode) + the decoder ``cfg.decoder`` names (:func:`~mal.pretrain.decoders.build_decoder`)
    + loss.

    ``forward(images (B, C, H, W), scan=None, generator=None) -> dict`` with
    ``loss`` (scalar), ``pred`` and ``target`` ``(B, Lq, P)`` for the queried sequence positions ``positions``
    ``(B, Lq)``, ``weight`` ``(B, Lq)`` (1 for predicted patches, 0 for first-unit queries of ragged random
    batches) and ``scan`` (the :class:`~mal.tokens.Scan` used; ``scan.order`` maps positions to raster indices).
    """

    def __init__(self, encoder: nn.Module, cfg: ObjectiveConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ObjectiveConfig()
        self.encoder = encoder
        ecfg = encoder.cfg
        if encoder.layout.num_units < 2:
            raise ValueError(
                f"the layout [{ecfg.layout.describe(ecfg.grid)}] has a single prediction unit: autoregression needs "
                "at least two (use smaller clusters or larger images)"
            )
        self.patch_size, self.channels = ecfg.patch_size, ecfg.in_chans
        if cfg.norm_pix and ecfg.patch_size == 1:
            raise ValueError(
                "objective.norm_pix normalizes each patch over its p*p*C values; a 1-pixel patch has only its "
                f"{ecfg.in_chans} channel value(s), so a grey pixel would become 0: use objective.norm_pix=false"
            )
        if cfg.memory == "taps":
            self.taps, memory_index = tap_schedule(ecfg.depth, cfg.decoder_depth)
        else:
            self.taps, memory_index = [], None
        # the last pair's tap is the encoder output itself (its final norm), so no encoder parameter goes unused
        self._inner_taps = sorted({t for t in self.taps if t != ecfg.depth - 1})  # taps may repeat when shallow
        self.tap_norms = nn.ModuleList(nn.LayerNorm(ecfg.dim) for _ in self._inner_taps)
        self.decoder = build_decoder(
            cfg.decoder,
            ecfg.dim,
            ecfg.patch_size**2 * ecfg.in_chans,
            dim=cfg.decoder_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads,
            mlp_ratio=cfg.decoder_mlp_ratio,
            num_memories=max(1, len(self.taps)),
            memory_index=memory_index,
        )

    def no_weight_decay(self) -> set[str]:
        enc = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        return enc | {f"decoder.{n}" for n in self.decoder.no_weight_decay()}

    def mal_card(self) -> dict:
        """The description saved with the weights (``config.json``): the encoder's, ``kind: pretrainer``, and the
        objective (what :func:`mal.load_model` rebuilds the decoder from)."""
        return pretrainer_card(self)

    def draw_scan(self, images: torch.Tensor, generator: torch.Generator | None = None) -> Scan:
        """The batch's scan: the fixed layout, or a fresh cluster order per sample for ``random``."""
        grid = self.encoder.patch_embed.grid(images)
        return self.encoder.draw_scan(images.shape[0], grid, generator=generator).to(images.device)

    def forward_encoder(self, images: torch.Tensor, scan: Scan) -> list[torch.Tensor]:
        """Memory for the decoder: ``[(B, M, D)]`` (last) or one per tap, in the scan's canonical order; ``M = L``
        or, with ``skip_last_unit``, the positions before the last unit."""
        # fixed layouts run from the encoder's cached plan; only random orders need the per-sample scan
        per_sample = scan if self.encoder.layout.cluster_order == "random" else None
        out, feats = self.encoder.forward_intermediates(
            images, self._inner_taps, mode="pretrain", scan=per_sample, drop_last_unit=self.cfg.skip_last_unit
        )
        if not self.taps:
            return [out]
        by_pair = {t: norm(f) for t, norm, f in zip(self._inner_taps, self.tap_norms, feats, strict=True)}
        return [by_pair.get(t, out) for t in self.taps]

    def query_positions(self, scan: Scan) -> torch.Tensor:
        """Sequence positions ``(B, Lq)`` that get a query: all but the first unit when its size is the same in
        every sample (always, except ragged clusters in random order), else every position."""
        first = (scan.unit_ids == 0).sum(dim=1)
        start = int(first[0]) if bool((first == first[0]).all()) else 0
        return torch.arange(start, scan.num_tokens, device=scan.order.device).expand(scan.batch_size, -1)

    def forward_decoder(self, memory: list[torch.Tensor], scan: Scan, positions: torch.Tensor) -> torch.Tensor:
        """Predicted pixels ``(B, Lq, P)`` of the sequence positions ``positions (B, Lq)``."""
        units, m = scan.unit_ids, memory[0].shape[1]
        return self.decoder(
            memory,
            memory_units=units[:, :m],
            memory_pos=scan.order[:, :m],
            query_units=units.gather(1, positions),
            query_pos=scan.order.gather(1, positions),
            grid=(scan.grid_h, scan.grid_w),
        )

    def targets(self, images: torch.Tensor, scan: Scan, positions: torch.Tensor) -> torch.Tensor:
        """Pixel targets ``(B, Lq, P)`` of ``positions``, normalized per patch when ``norm_pix``."""
        patches = serialize(patchify(images, self.patch_size), scan.order)  # (B, L, P) in scan order
        patches = patches.gather(1, positions[..., None].expand(-1, -1, patches.shape[-1]))
        return normalize_patches(patches) if self.cfg.norm_pix else patches

    def forward_loss(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """MSE per patch, averaged over predicted patches (every patch counts equally)."""
        per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, Lq)
        return (per_patch * weight).sum() / weight.sum()

    def forward(
        self, images: torch.Tensor, scan: Scan | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor | Scan]:
        scan = scan if scan is not None else self.draw_scan(images, generator)
        positions = self.query_positions(scan)
        pred = self.forward_decoder(self.forward_encoder(images, scan), scan, positions)
        target = self.targets(images, scan, positions)
        weight = (scan.unit_ids.gather(1, positions) > 0).to(target.dtype)
        loss = self.forward_loss(pred, target, weight)
        return {"loss": loss, "pred": pred, "target": target, "positions": positions, "weight": weight, "scan": scan}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, out: dict) -> dict[str, torch.Tensor]:
        """Images ``(B, C, H, W)`` in the input's (normalized) space for plotting: ``prediction`` (predicted
        patches, un-normalized with the true patch statistics when ``norm_pix``; the first unit, which is never
        predicted, is shown from the input) and ``context`` (the input with the predicted patches greyed out
        for the first predicted unit only, i.e. what the first prediction saw)."""
        scan: Scan = out["scan"]
        p, C = self.patch_size, self.channels
        raw = serialize(patchify(images, p), scan.order)  # (B, L, P)
        idx = out["positions"][..., None].expand(-1, -1, raw.shape[-1])
        pred = out["pred"].float()
        if self.cfg.norm_pix:
            tgt = raw.gather(1, idx)
            pred = pred * (tgt.var(dim=-1, keepdim=True) + 1e-6).sqrt() + tgt.mean(dim=-1, keepdim=True)
        keep = out["weight"][..., None] > 0
        full = raw.scatter(1, idx, torch.where(keep, pred.to(raw.dtype), raw.gather(1, idx)))
        prediction = unpatchify(unserialize(full, scan.order), p, scan.grid_h, scan.grid_w, C)
        first = (scan.unit_ids == 0)[..., None]
        context = unpatchify(unserialize(torch.where(first, raw, 0.0), scan.order), p, scan.grid_h, scan.grid_w, C)
        return {"prediction": prediction, "context": context}
