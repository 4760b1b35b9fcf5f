"""Fine-tuning: classification from a MAL checkpoint, from scratch, or as a linear probe."""

from mal.finetune.mix import MixupCutmix, one_hot_smooth, soft_cross_entropy
from mal.finetune.task import (
    ClassificationTask,
    FinetuneConfig,
    finetune,
    layer_id,
    load_encoder_weights,
    load_finetune_config,
)

__all__ = [
    "ClassificationTask",
    "FinetuneConfig",
    "MixupCutmix",
    "finetune",
    "layer_id",
    "load_encoder_weights",
    "load_finetune_config",
    "one_hot_smooth",
    "soft_cross_entropy",
]
