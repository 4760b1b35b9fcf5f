"""Models on disk, whatever trained them: :func:`load_model` rebuilds the exact model from the description saved with
its weights (``config.json`` + ``model.safetensors``, the Hugging Face Hub layout), :func:`save_model` writes one.

    model = mal.load_model("runs/demo/seed0/mal")         # a run folder: its latest checkpoint, in eval mode
    mal.save_model(model, "exported/mal_micro_digits")    # config.json + model.safetensors
    model = mal.load_model("exported/mal_micro_digits")   # the same model, the same outputs

A pretraining checkpoint gives its encoder (``decoder=True``: the whole pretraining model, decoder included); a
dense fine-tuning checkpoint gives the encoder with its segmentation or depth head, a detection checkpoint the
detector (:class:`~mal.tasks.detection.Detector`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mal.io import CONFIG_NAME, read_safetensors, tensor_shapes
from mal.models.factory import find_weights, model_from_card, save_model

__all__ = ["load_model", "save_model"]


def load_model(path: str | Path, *, decoder: bool = False, ema: bool = False) -> nn.Module:
    """The model saved at ``path``, in eval mode.

    ``path``: a run folder (its latest checkpoint), a checkpoint folder, a folder written by :func:`save_model`,
    or a ``.safetensors`` file with its description in the metadata. Classifiers, encoders and dense models come
    back whole; a pretraining checkpoint gives its encoder, or with ``decoder=True`` the pretraining model.
    ``ema=True``: the EMA of the weights that a fine-tuning checkpoint keeps (``state.pt``).
    """
    file, card = find_weights(path)
    kind = card.get("kind")
    if decoder and kind != "pretrainer":
        raise ValueError(f"{file} is a {kind} model, not a pretraining checkpoint: it has no decoder")

    def build() -> nn.Module:
        if kind in ("classifier", "encoder"):
            return model_from_card(card)
        if kind == "pretrainer" and decoder:
            from mal.pretrain.task import pretrainer_from_card

            return pretrainer_from_card(card)
        if kind == "pretrainer":
            return model_from_card(card, encoder_only=True)
        if kind == "dense":
            from mal.tasks.dense import DensePredictor

            return DensePredictor.from_card(card)
        if kind == "detector":
            from mal.tasks.detection import Detector

            return Detector.from_card(card)
        raise ValueError(f"{file}: unknown model kind {kind!r} in its description")

    prefix = "encoder." if kind == "pretrainer" and not decoder else ""
    with torch.device("meta"):  # shapes only: a wrong description must not allocate the model it describes
        described = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    stored = {k.removeprefix(prefix): v for k, v in tensor_shapes(file).items() if k.startswith(prefix)}
    differ = [f"{k} {described.get(k)} in the description, {stored.get(k)} in the file"
              for k in sorted(described.keys() | stored.keys()) if described.get(k) != stored.get(k)]  # fmt: skip
    if differ:
        raise ValueError(
            f"{file}: its description ({CONFIG_NAME}) does not match its tensors ({len(differ)} differ: "
            f"{'; '.join(differ[:3])})"
        )
    model = build()
    state = read_safetensors(file)
    if prefix:
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    if ema:
        from mal.finetune.tasks import load_ema_weights

        if kind == "pretrainer":
            raise ValueError(f"{file}: pretraining keeps no EMA of the weights")
        load_ema_weights(model, file.parent)
    return model.eval()
