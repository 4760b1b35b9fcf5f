"""Encoders and their registry."""

from mal.models.official import vil_from_official
from mal.models.registry import create_encoder, create_model, list_models, model_config
from mal.models.vil import ViLClassifier, ViLConfig, ViLEncoder
from mal.models.vit import ViTClassifier, ViTConfig, ViTEncoder

__all__ = [
    "ViLClassifier",
    "ViLConfig",
    "ViLEncoder",
    "ViTClassifier",
    "ViTConfig",
    "ViTEncoder",
    "create_encoder",
    "create_model",
    "list_models",
    "model_config",
    "vil_from_official",
]
