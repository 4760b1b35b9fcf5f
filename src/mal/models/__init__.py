"""Encoders, classifiers, their registry and the model files they are saved as."""

from mal.models.base import EncoderClassifier, EncoderConfig, compile_blocks
from mal.models.factory import create_encoder, create_model, find_weights, save_model
from mal.models.features import FeatureEncoder, PyramidBackbone, SimpleFeaturePyramid
from mal.models.mamba import ARMConfig, MambaClassifier, MambaEncoder, VimConfig
from mal.models.official import vil_from_official
from mal.models.registry import list_models, model_config
from mal.models.vil import ViLClassifier, ViLConfig, ViLEncoder
from mal.models.vit import ViTClassifier, ViTConfig, ViTEncoder
from mal.tokens import LayoutConfig

__all__ = [
    "ARMConfig",
    "MambaClassifier",
    "MambaEncoder",
    "VimConfig",
    "EncoderClassifier",
    "EncoderConfig",
    "FeatureEncoder",
    "LayoutConfig",
    "PyramidBackbone",
    "SimpleFeaturePyramid",
    "ViLClassifier",
    "ViLConfig",
    "ViLEncoder",
    "ViTClassifier",
    "ViTConfig",
    "ViTEncoder",
    "compile_blocks",
    "create_encoder",
    "create_model",
    "find_weights",
    "list_models",
    "model_config",
    "save_model",
    "vil_from_official",
]
