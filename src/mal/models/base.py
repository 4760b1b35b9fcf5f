"""What every encoder and classifier shares: the config fields (:class:`EncoderConfig`), the layout record that
travels with the weights (:class:`LayoutRecorded`), and the timm-style classifier surface
(:class:`EncoderClassifier`).

The layout decides the token order every weight was trained on, so it is part of the weights: ``state_dict()`` of
an encoder carries ``layout_record`` (the JSON of its :class:`~mal.tokens.LayoutConfig` as a ``uint8`` tensor, so it
survives safetensors), and ``load_state_dict`` raises a ``ValueError`` naming both layouts when the record says
another token order than the model's.

Shapes: ``B`` batch, ``L = Gh * Gw`` tokens, ``D`` width.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
import torch.utils.checkpoint
from torch import nn

from mal._version import __version__
from mal.config import to_dict
from mal.tokens import LayoutConfig, unserialize

#: State-dict key (under the encoder's prefix) of the layout record.
LAYOUT_KEY = "layout_record"
HEAD_NORMS = ("none", "batchnorm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``format`` of the model description saved with weights (``config.json``, safetensors metadata).
CARD_FORMAT = "mal-model"
CARD_VERSION = 1


@dataclass
class EncoderConfig:
    """The fields every encoder config has (:class:`~mal.models.vil.ViLConfig`, :class:`~mal.models.vit.ViTConfig`).

    ``depth`` counts the encoder's layers for layer decay (ViL block pairs, ViT blocks); ``num_classes = 0`` means
    no head; ``head_norm="batchnorm"`` puts MAE's linear-probe BatchNorm (no affine parameters) before the head.
    ``layout`` (a :class:`~mal.tokens.LayoutConfig` or a mapping of its fields) is the token layout.
    """

    family: ClassVar[str] = ""  # the registry's family name of the config class

    dim: int = 192
    depth: int = 12
    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    drop_path_rate: float = 0.0
    drop_path_decay: bool = False  # linearly increasing drop path over the layers
    head_norm: Literal["none", "batchnorm"] = "none"
    layout: LayoutConfig = field(default_factory=LayoutConfig)

    def __post_init__(self) -> None:
        if isinstance(self.layout, Mapping):
            self.layout = LayoutConfig.from_dict(self.layout)
        elif not isinstance(self.layout, LayoutConfig):
            raise ValueError(f"layout must be a LayoutConfig or a mapping of its fields, got {self.layout!r}")
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        if self.head_norm not in HEAD_NORMS:
            raise ValueError(f"unknown head_norm {self.head_norm!r}; valid: {', '.join(HEAD_NORMS)}")
        size = (self.image_size,) * 2 if isinstance(self.image_size, int) else self.image_size
        self.check(
            dim=self.dim >= 1, depth=self.depth >= 1, patch_size=self.patch_size >= 1, in_chans=self.in_chans >= 1,
            num_classes=self.num_classes >= 0, image_size=len(size) == 2 and min(size) >= 1,
            drop_path_rate=0 <= self.drop_path_rate < 1,
        )  # fmt: skip
        if self.layout.unit == "pixel" and self.patch_size != 1:
            raise ValueError(
                f"unit 'pixel' predicts single pixels (iGPT-style): it needs patch_size=1, got {self.patch_size} (with "
                "larger patches every token is a patch: that is unit 'cluster' with cluster_size=1)"
            )

    def check(self, **ok: bool) -> None:
        """Raise a ``ValueError`` naming the first field whose check is False, with its value (a negative width
        would otherwise surface as a tensor-shape error deep in the build)."""
        for name, good in ok.items():
            if not good:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")

    @property
    def grid(self) -> tuple[int, int]:
        h, w = (self.image_size, self.image_size) if isinstance(self.image_size, int) else self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def resolved(self) -> EncoderConfig:
        """This config with its layout's grid set to the model's patch grid when unset (what a built model keeps)."""
        return replace(self, layout=self.layout.resolved(self.grid))


# ----------------------------------------------------------------------------------------------------------------
# the layout record
# ----------------------------------------------------------------------------------------------------------------


def layout_record(layout: LayoutConfig) -> torch.Tensor:
    """``uint8 (N,)``: the UTF-8 JSON of ``layout`` (a tensor, so that it is saved with the weights)."""
    text = json.dumps(layout.to_dict(), sort_keys=True, separators=(",", ":"))
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).clone()


def read_layout_record(record: torch.Tensor) -> LayoutConfig:
    """Inverse of :func:`layout_record`."""
    try:
        return LayoutConfig.from_dict(json.loads(bytes(record.cpu().to(torch.uint8).tolist()).decode()))
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"unreadable layout record in the weights ({e})") from e


def layouts_match(a: LayoutConfig, b: LayoutConfig, grid: tuple[int, int], num_pairs: int) -> bool:
    """Whether two layouts give the same token order at patch grid ``grid`` (:meth:`LayoutConfig.signature`)."""
    try:
        return a.signature(grid, num_pairs) == b.signature(grid, num_pairs)
    except ValueError:  # a layout that does not fit this grid or depth
        return False


def layout_mismatch_message(saved: LayoutConfig, ours: LayoutConfig, grid: tuple[int, int]) -> str:
    return (
        f"the weights were trained with the token layout [{saved.describe()}] but this model has "
        f"[{ours.describe(grid)}]; build the model from its weights (mal.load_model(path) or "
        "mal.create_model(name, pretrained=path)) or give it the same layout"
    )


class LayoutRecorded:
    """Mixin of the encoders (``nn.Module`` with ``cfg.layout`` and ``cfg.grid``): ``state_dict()`` carries
    ``layout_record``; ``load_state_dict`` checks it (see the module docstring). Call :meth:`_record_layout` in
    ``__init__``. Weights without a record (saved before records existed) load with a warning."""

    cfg: Any

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them (timm's name): activation
        memory of about one block instead of all, for about one more forward of compute
        (``benchmarks/grad_checkpointing.py`` measures both). Only while gradients are being recorded."""
        self.grad_checkpointing = enable

    def run_block(self, block: nn.Module, *args: Any) -> torch.Tensor:
        """``block(*args)``, checkpointed (non-reentrant, RNG state kept) when grad checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def run_blocks(self, t: torch.Tensor, indices: list[int] | None, *args: Any) -> tuple[torch.Tensor, list]:
        """Every block on ``t: (B, L, D)`` (each called ``block(t, *args)``, see :meth:`run_block`): the final-normed
        output and the outputs of the blocks in ``indices`` (before the final norm), as ``forward_intermediates``."""
        feats = []
        for i, block in enumerate(self.blocks):
            t = self.run_block(block, t, *args)
            if indices is not None and i in indices:
                feats.append(t)
        return self.norm(t), feats

    def _record_layout(self) -> None:
        self.register_state_dict_post_hook(_add_layout_record)
        self.register_load_state_dict_pre_hook(_check_layout_record)

    def mal_card(self) -> dict[str, Any]:
        """What ``config.json`` holds for this encoder (see :func:`card`)."""
        return card("encoder", self.cfg, self.pretrained_cfg)

    def compile_blocks(self, **compile_kwargs: Any) -> int:
        """Compile each block (a ViL block pair, a ViT block) in place as one graph with ``torch.compile``
        (``nn.Module.compile``: parameters and state-dict keys stay as they are). On CUDA this fuses what surrounds
        the mLSTM cell (projections, gates, norms, the skip and the masked 3x3 conv), the part of the block the
        cell's kernel does not cover; the scan planning stays outside the graphs, and a cell whose backend runs
        eagerly (``triton``) is a graph break inside its block. The first forward of each shape (resolution, mode,
        batch) compiles. On CPU the eager path is the measured one (its block-diagonal and channels-first forms
        are chosen eagerly); ``benchmarks/gpu_check.py`` measures this on a GPU (section ``compiled``).
        ``compile_kwargs`` go to ``torch.compile`` (``mode="reduce-overhead"``: replayed as CUDA graphs on CUDA).
        Returns the number of blocks compiled."""
        from mal.kernels import list_backends

        list_backends()  # registers the optional backends now: done inside the first graph, it forces a recompile
        for block in self.blocks:
            block.compile(**compile_kwargs)
        return len(self.blocks)


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile every encoder block of ``model`` in place (:meth:`LayoutRecorded.compile_blocks` of each encoder in
    it: a classifier, a dense model, a pretrainer or an encoder). Returns the number of blocks compiled."""
    return sum(m.compile_blocks(**compile_kwargs) for m in model.modules() if isinstance(m, LayoutRecorded))


def _add_layout_record(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    state_dict[prefix + LAYOUT_KEY] = layout_record(module.cfg.layout)


def _check_layout_record(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    key = prefix + LAYOUT_KEY
    if key not in state_dict:
        if any(k.startswith(prefix) for k in state_dict):
            warnings.warn(
                "these weights carry no layout record (saved by an older mal): their token layout cannot be "
                "checked against the model's",
                stacklevel=4,
            )
        return
    saved = read_layout_record(state_dict.pop(key))  # the dict is the loader's own copy
    ours, grid = module.cfg.layout, module.cfg.grid
    if not layouts_match(saved, ours, grid, module.cfg.depth):
        raise ValueError(layout_mismatch_message(saved, ours, grid))


def card(kind: str, cfg: EncoderConfig, pretrained_cfg: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The description saved with a model's weights (``config.json``): what :func:`mal.load_model` rebuilds the exact
    model from. ``kind``: ``encoder``, ``classifier``, or a higher-level model's (``pretrainer``, ``dense``), whose
    own fields come in ``extra``."""
    config = to_dict(cfg)
    timm = timm_fields(config, pretrained_cfg, cfg.num_classes) if kind in ("classifier", "encoder") else {}
    return {
        "format": CARD_FORMAT,
        "format_version": CARD_VERSION,
        "mal_version": __version__,
        "kind": kind,
        "family": cfg.family,
        "config": config,
        "pretrained_cfg": to_dict(pretrained_cfg),
        **timm,  # architecture, num_classes, model_args: what timm.create_model("local-dir:...") reads
        **extra,
    }


def timm_fields(config: dict[str, Any], pretrained_cfg: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """What timm reads from ``config.json`` besides ``pretrained_cfg`` (:mod:`mal.models.timm_compat`):
    ``architecture`` (the registered name the model was built from), ``num_classes`` and ``model_args`` (the whole
    config); empty for a model that no registered name built."""
    arch = pretrained_cfg.get("architecture")
    if not arch:
        return {}
    return {"architecture": arch, "num_classes": num_classes, "model_args": config}


def encoder_layer(name: str, num_layers: int, prefix: str = "encoder.") -> int:
    """Layer of a parameter of a model with an encoder under ``prefix``: 0 = patch and position embedding, ``i + 1`` =
    the encoder's layer ``i`` (``blocks.i``), ``num_layers + 1`` = everything after it (final norm, heads)."""
    if name.startswith((f"{prefix}patch_embed.", f"{prefix}pos_embed.")):
        return 0
    rest = name.removeprefix(f"{prefix}blocks.")
    if rest != name:
        return int(rest.split(".", 1)[0]) + 1
    return num_layers + 1


def default_pretrained_cfg(cfg: EncoderConfig) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of a model built from ``cfg``: input size, normalization (ImageNet's for three
    channels, 0.5 otherwise, until a training run records its data's), and the layout."""
    h, w = (cfg.image_size, cfg.image_size) if isinstance(cfg.image_size, int) else cfg.image_size
    rgb = cfg.in_chans == 3
    return {
        "input_size": (cfg.in_chans, h, w),
        "mean": IMAGENET_MEAN if rgb else (0.5,) * cfg.in_chans,
        "std": IMAGENET_STD if rgb else (0.5,) * cfg.in_chans,
        "interpolation": "bicubic",
        "first_conv": "patch_embed.proj",
        "layout": cfg.layout.to_dict(),
    }


# ----------------------------------------------------------------------------------------------------------------
# classifiers
# ----------------------------------------------------------------------------------------------------------------


class WithEncoder(nn.Module):
    """A model made of ``encoder`` and what reads its features (a head): the weight-decay exceptions and the
    layers of layer-wise lr decay (as timm's ``group_matcher``: :meth:`layer_of` in ``0 .. num_layers + 1``)."""

    encoder: nn.Module

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    @property
    def num_layers(self) -> int:
        """The encoder's layers (ViL block pairs, ViT blocks): the unit of layer-wise lr decay."""
        return self.encoder.num_layers

    def layer_of(self, name: str) -> int:
        """Layer of a parameter for layer-wise lr decay (:func:`encoder_layer`; the head after every layer)."""
        return encoder_layer(name, self.num_layers)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups by regex: the embeddings (``stem``), then one group per encoder layer; the final
        norm last among the blocks (what :meth:`layer_of` says, for timm's layer-decay helpers)."""
        return {
            "stem": r"^encoder\.(patch_embed|pos_embed)",
            "blocks": [(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm", (99999,))],
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the encoder's blocks (:meth:`LayoutRecorded.set_grad_checkpointing`)."""
        self.encoder.set_grad_checkpointing(enable)


class EncoderClassifier(WithEncoder):
    """What the classifiers share: ``encoder`` + pooling + ``head``, with timm's surface.

    ``forward(x: (B, C, H, W)) -> (B, num_classes)``; ``forward_features`` -> ``(B, L, D)`` tokens (canonical
    order); ``forward_head(tokens, pre_logits=False)``; ``forward_intermediates`` (raster feature maps);
    ``num_features`` (feature width) and ``head_hidden_size`` (pooled width) as timm defines them, ``get_classifier()``,
    ``reset_classifier(n)``, ``pretrained_cfg``, ``set_grad_checkpointing()``, ``group_matcher()``.
    Subclasses set ``cfg``, ``encoder``, ``head`` (via :meth:`make_head`) and implement :meth:`pool`.
    """

    encoder: nn.Module
    cfg: EncoderConfig

    def make_head(self, width: int, num_classes: int) -> nn.Module:
        """``Linear(width, num_classes)`` with near-zero weights (MAE fine-tuning), behind a BatchNorm without
        affine parameters when ``cfg.head_norm == "batchnorm"`` (``head.0``, ``head.1``); Identity for 0 classes."""
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(head.weight, std=2e-5)
        nn.init.zeros_(head.bias)
        if self.cfg.head_norm == "batchnorm":
            return nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), head)
        return head

    @property
    def num_features(self) -> int:
        """Width of the encoder's features (timm: ``forward_features``' channels, what ``features_only`` maps have)."""
        return self.cfg.dim

    @property
    def head_hidden_size(self) -> int:
        """Width of the pooled features the head reads (timm's name; ViL's first + last token: twice the width)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg``: input size, mean/std, layout (the encoder's), classes and head name, and
        ``label_names`` (the class name of each logit) when a fine-tuning run recorded its data's
        (:meth:`set_label_names`)."""
        cfg = {**self.encoder.pretrained_cfg, "num_classes": self.cfg.num_classes, "classifier": "head",
               "first_conv": "encoder.patch_embed.proj"}  # fmt: skip
        if len(cfg.get("label_names") or ()) != self.cfg.num_classes:
            cfg.pop("label_names", None)  # names of another head are no names of this one
        return cfg

    def set_label_names(self, names: Sequence[str] | None) -> None:
        """Record the class name of each logit (timm's ``pretrained_cfg["label_names"]``), saved with the weights;
        None forgets them. Raises ``ValueError`` when the count is not the number of classes."""
        if names is None:
            self.encoder.pretrained_cfg.pop("label_names", None)
            return
        names = [str(n) for n in names]
        if len(names) != self.cfg.num_classes:
            raise ValueError(f"{len(names)} label names for a head of {self.cfg.num_classes} classes")
        self.encoder.pretrained_cfg["label_names"] = names

    def mal_card(self) -> dict[str, Any]:
        """What ``config.json`` holds for this classifier (see :func:`card`)."""
        return card("classifier", self.cfg, self.pretrained_cfg)

    def get_classifier(self) -> nn.Module:
        """The final linear layer (``Identity`` without classes)."""
        return self.head[-1] if isinstance(self.head, nn.Sequential) else self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new head for ``num_classes`` classes (0: none; the model then returns pooled features). Label names
        are kept only when their count still matches (the same classes, e.g. a head reinitialized)."""
        if len(self.encoder.pretrained_cfg.get("label_names") or ()) != num_classes:
            self.set_label_names(None)
        self.cfg = replace(self.cfg, num_classes=num_classes)
        self.encoder.cfg = replace(self.encoder.cfg, num_classes=num_classes)
        device = next(self.parameters()).device
        self.head = self.make_head(self.head_hidden_size, num_classes).to(device)

    def forward_features(self, x: torch.Tensor, mode: str = "finetune") -> torch.Tensor:
        """``(B, C, H, W) -> (B, L, D)`` token features after the final norm, canonical order."""
        return self.encoder(x, mode=mode)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L, D)`` canonical tokens -> ``(B, head_hidden_size)``."""
        raise NotImplementedError

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, L, D) -> (B, num_classes)``, or the pooled ``(B, head_hidden_size)`` with ``pre_logits=True``."""
        pooled = self.pool(tokens)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: Literal["NCHW", "NLC"] = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of encoder layers (block pairs for ViL, blocks for ViT), as timm's ``forward_intermediates``.

        ``indices``: an int ``n`` takes the last ``n`` layers, a sequence takes those layers (negative from the
        end), None all of them. Each intermediate is ``(B, D, Gh, Gw)`` (``NCHW``) or ``(B, L, D)`` (``NLC``), in
        **raster order** whatever the layout; ``norm=True`` applies the encoder's final norm to them. Returns the
        list, or ``(final tokens (B, L, D) in canonical order as forward_features, list)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        n = self.encoder.num_layers
        if indices is None:
            picked = list(range(n))
        elif isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"indices={indices}: take the last 1..{n} layers")
            picked = list(range(n - indices, n))
        else:
            picked = [i + n if i < 0 else i for i in indices]
            bad = [i for i in indices if not -n <= i < n]
            if bad:
                raise ValueError(f"layer indices {bad} out of range for {n} layers")
        grid = self.encoder.patch_embed.grid(x)
        final, feats = self.encoder.forward_intermediates(x, sorted(set(picked)), mode="finetune")
        by_index = dict(zip(sorted(set(picked)), feats, strict=True))
        order = self.encoder.layout_for(grid).order.to(x.device)
        out = []
        for i in picked:
            t = by_index[i]
            t = unserialize(self.encoder.norm(t) if norm else t, order)  # (B, L, D) raster
            out.append(t if output_fmt == "NLC" else t.transpose(1, 2).reshape(t.shape[0], -1, *grid))
        return out if intermediates_only else (final, out)
