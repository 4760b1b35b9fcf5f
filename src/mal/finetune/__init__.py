"""Fine-tuning: classification and dense tasks from a checkpoint (its model), from scratch, or as a linear probe."""

from mal.finetune.config import FinetuneConfig, InitSettings, RecipeSettings, build_model, load_finetune_config
from mal.finetune.tasks import (
    ClassificationTask,
    DenseTask,
    DetectionTask,
    EncoderTask,
    finetune,
    load_classifier,
    load_dense_model,
    load_detector,
    load_encoder_weights,
)

__all__ = [
    "ClassificationTask",
    "DenseTask",
    "DetectionTask",
    "EncoderTask",
    "FinetuneConfig",
    "InitSettings",
    "RecipeSettings",
    "build_model",
    "finetune",
    "load_classifier",
    "load_dense_model",
    "load_detector",
    "load_encoder_weights",
    "load_finetune_config",
]
