"""Models on disk and on the Hugging Face Hub, whatever trained them: :func:`load_model` rebuilds the exact model from
the description saved with its weights (``config.json`` + ``model.safetensors``, the Hub's layout), :func:`save_model`
writes one (with its model card, ``README.md``), :func:`push_to_hub` uploads one.

    model = mal.load_model("runs/demo/seed0/mal")         # a run folder: its latest checkpoint, in eval mode
    mal.save_model(model, "exported/mal_micro_digits")    # config.json + model.safetensors + README.md
    model = mal.load_model("exported/mal_micro_digits")   # the same model, the same outputs
    mal.push_to_hub(model, "me/mal_micro_digits")         # the same files, to huggingface.co/me/mal_micro_digits
    model = mal.load_model("hf-hub:me/mal_micro_digits")  # downloaded once into the Hub's cache

A pretraining checkpoint gives its encoder (``decoder=True``: the whole pretraining model, decoder included); a
dense fine-tuning checkpoint gives the encoder with its segmentation or depth head, a detection checkpoint the
detector (:class:`~mal.tasks.detection.Detector`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mal.io import CONFIG_NAME, read_safetensors, tensor_shapes
from mal.models.factory import find_weights, import_huggingface_hub, model_from_card, save_model

__all__ = ["load_model", "push_to_hub", "save_model"]


def load_model(path: str | Path, *, decoder: bool = False, ema: bool = False) -> nn.Module:
    """The model saved at ``path``, in eval mode.

    ``path``: a run folder (its latest checkpoint), a checkpoint folder, a folder written by :func:`save_model`,
    a ``.safetensors`` file with its description in the metadata, or a model on the Hugging Face Hub,
    ``hf-hub:ORG/NAME[@REVISION]`` (downloaded into the Hub's cache, or read from it alone with ``HF_HUB_OFFLINE=1``;
    needs ``pip install 'mal-vision[hub]'``). Classifiers, encoders and dense models come
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


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str = "Upload mal model",
    token: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> Any:
    """Upload ``model`` to the Hugging Face Hub model repo ``repo_id`` (``"ORG/NAME"``, created when missing, as
    ``private`` if asked): the files :func:`save_model` writes (``config.json``, ``model.safetensors``, and the model
    card ``README.md`` with ``metrics`` and the lines that load it from ``hf-hub:ORG/NAME``), in one commit.
    ``token``: a Hub token, else the one ``hf auth login`` stored (or ``HF_TOKEN``). Returns the Hub's
    ``CommitInfo`` (a ``str``, the commit's URL; ``.repo_url`` is the repo's)."""
    hub = import_huggingface_hub()
    api = hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="mal-push-") as tmp:
        folder = save_model(model, Path(tmp) / "model", metrics=metrics, repo_id=repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
