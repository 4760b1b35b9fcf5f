"""MAL: cluster-masked autoregressive pretraining of Vision-LSTM (xLSTM) backbones."""

from mal._version import __version__
from mal.hub import load_model, save_model
from mal.models import create_encoder, create_model, list_models, vil_from_official
from mal.tokens import LayoutConfig

__all__ = [
    "LayoutConfig",
    "__version__",
    "create_encoder",
    "create_model",
    "list_models",
    "load_model",
    "save_model",
    "vil_from_official",
]
