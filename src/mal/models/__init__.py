"""Encoders and their registry."""

from mal.models.official import vil_from_official
from mal.models.registry import create_encoder, create_model, list_models, model_config
from mal.models.vil import ViLClassifier, ViLConfig, ViLEncoder

__all__ = [
    "ViLClassifier",
    "ViLConfig",
    "ViLEncoder",
    "create_encoder",
    "create_model",
    "list_models",
    "model_config",
    "vil_from_official",
]
