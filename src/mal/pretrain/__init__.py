"""Pretraining objectives: cluster-masked autoregression (MAL)."""

from mal.pretrain.decoder import ARDecoder, decoder_masks, sincos_pos_embed_2d
from mal.pretrain.mae import MAEDecoder, MAEPretrainer
from mal.pretrain.objective import MALPretrainer, ObjectiveConfig, normalize_patches

__all__ = [
    "ARDecoder",
    "MAEDecoder",
    "MAEPretrainer",
    "MALPretrainer",
    "ObjectiveConfig",
    "decoder_masks",
    "normalize_patches",
    "sincos_pos_embed_2d",
]
