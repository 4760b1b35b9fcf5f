"""Pretraining objectives: cluster-masked autoregression (MAL) with its decoders, and the MAE baseline."""

from mal.pretrain.decoder import ARDecoder, decoder_masks, sincos_pos_embed_2d
from mal.pretrain.decoders import MambaDecoder, MLSTMDecoder, build_decoder
from mal.pretrain.mae import MAEDecoder, MAEPretrainer
from mal.pretrain.objective import MALPretrainer, ObjectiveConfig, normalize_patches

__all__ = [
    "ARDecoder",
    "MAEDecoder",
    "MAEPretrainer",
    "MALPretrainer",
    "MLSTMDecoder",
    "MambaDecoder",
    "ObjectiveConfig",
    "build_decoder",
    "decoder_masks",
    "normalize_patches",
    "sincos_pos_embed_2d",
]
