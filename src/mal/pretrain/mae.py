"""The MAE baseline (docs/DESIGN.md, 'Baselines'): random masking of ``mask_ratio`` of the patches, the encoder on
the visible patches only (``encoder.forward_visible``: for ViL the visible tokens in scan order, the conv on a zero
grid), and MAE's decoder over all tokens with mask tokens; MSE on the masked patches (normalized per patch).

Shapes: ``B`` batch, ``L`` patches, ``Lv`` visible patches, ``D`` encoder width, ``E`` decoder width,
``P = p * p * C`` pixels per patch. Outputs are in raster order.
"""

from __future__ import annotations

import torch
from torch import nn

from mal.models.layers import init_transformer_
from mal.models.vit import ViTBlock
from mal.pretrain.decoder import sincos_table
from mal.pretrain.objective import ObjectiveConfig, normalize_patches, pretrainer_card
from mal.tokens import patchify, unpatchify


class MAEDecoder(nn.Module):
    """``forward(tokens (B, Lv, D), visible (B, Lv), grid) -> (B, L, P)``: visible tokens embedded to width ``E``
    and put at their raster positions, a learned mask token elsewhere, fixed 2-D sin-cos positions, ``depth``
    Transformer blocks with full attention, LayerNorm, a linear map to the pixels of each patch."""

    def __init__(
        self, encoder_dim: int, patch_dim: int, *, dim: int = 512, depth: int = 8, num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_dim)
        init_transformer_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: torch.Tensor, visible: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, L = tokens.shape[0], grid[0] * grid[1]
        x = self.mask_token.to(tokens.dtype).expand(B, L, -1)
        x = x.scatter(1, visible[..., None].expand(-1, -1, self.dim), self.embed(tokens))
        x = x + sincos_table(self.dim, *grid, str(x.device)).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class MAEPretrainer(nn.Module):
    """Encoder (visible patches) + :class:`MAEDecoder` + loss on the masked patches.

    ``forward(images (B, C, H, W), generator=None) -> dict`` with ``loss`` (scalar), ``pred`` and ``target``
    ``(B, L, P)`` in raster order and ``mask`` ``(B, L)`` (1 = masked, predicted). Every sample hides
    ``floor(L * mask_ratio)`` patches, drawn uniformly (torch's global RNG unless ``generator`` is given).
    """

    def __init__(self, encoder: nn.Module, cfg: ObjectiveConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ObjectiveConfig(method="mae")
        self.encoder = encoder
        ecfg = encoder.cfg
        self.patch_size, self.channels = ecfg.patch_size, ecfg.in_chans
        self.decoder = MAEDecoder(
            ecfg.dim, ecfg.patch_size**2 * ecfg.in_chans, dim=cfg.decoder_dim, depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads, mlp_ratio=cfg.decoder_mlp_ratio,
        )  # fmt: skip

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"decoder.mask_token"}

    def mal_card(self) -> dict:
        """The description saved with the weights (see :func:`~mal.pretrain.objective.pretrainer_card`)."""
        return pretrainer_card(self)

    def draw_visible(self, batch_size: int, num_tokens: int, device, generator=None) -> torch.Tensor:  # noqa: ANN001
        """Raster indices ``(B, Lv)`` of the visible patches: a uniform random subset per sample."""
        n_masked = int(num_tokens * self.cfg.mask_ratio)
        if not 0 < n_masked < num_tokens:
            raise ValueError(f"mask_ratio {self.cfg.mask_ratio} leaves no masked or no visible patch of {num_tokens}")
        noise = torch.rand(batch_size, num_tokens, generator=generator)
        return noise.argsort(dim=1)[:, : num_tokens - n_masked].to(device)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        grid = self.encoder.patch_embed.grid(images)
        B, L = images.shape[0], grid[0] * grid[1]
        visible = self.draw_visible(B, L, images.device, generator)
        tokens, visible = self.encoder.forward_visible(images, visible)
        pred = self.decoder(tokens, visible, grid)
        patches = patchify(images, self.patch_size)
        target = normalize_patches(patches) if self.cfg.norm_pix else patches
        mask = torch.ones(B, L, device=images.device, dtype=target.dtype).scatter(1, visible, 0.0)
        per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return {"loss": loss, "pred": pred, "target": target, "mask": mask, "grid": grid}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, out: dict) -> dict[str, torch.Tensor]:
        """``prediction``: the visible patches from the input, the masked ones predicted (un-normalized with the
        true patch statistics when ``norm_pix``); ``context``: the visible patches only. ``(B, C, H, W)``."""
        p, (gh, gw) = self.patch_size, out["grid"]
        raw = patchify(images, p)
        pred = out["pred"].float()
        if self.cfg.norm_pix:
            pred = pred * (raw.var(dim=-1, keepdim=True) + 1e-6).sqrt() + raw.mean(dim=-1, keepdim=True)
        masked = out["mask"][..., None] > 0
        prediction = unpatchify(torch.where(masked, pred.to(raw.dtype), raw), p, gh, gw, self.channels)
        context = unpatchify(torch.where(masked, 0.0, raw), p, gh, gw, self.channels)
        return {"prediction": prediction, "context": context}
