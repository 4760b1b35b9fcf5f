"""MAL: cluster-masked autoregressive pretraining of Vision-LSTM (xLSTM) backbones."""

from mal.models import create_encoder, create_model, list_models, vil_from_official

__version__ = "0.1.0"
__all__ = ["create_encoder", "create_model", "list_models", "vil_from_official", "__version__"]
