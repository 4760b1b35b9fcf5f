"""Mamba encoders with the same embedding, layouts and surface as the ViL and ViT encoders: **Vim** (Zhu et al.
2024, "Vision Mamba", https://arxiv.org/abs/2401.09417) and ARM's **MambaMLP** (Ren et al. 2024, "Autoregressive
Pretraining with Mamba in Vision", https://arxiv.org/abs/2406.07537), the Mamba rows of MAL-v2 Tables 1, 3, 4, 9.

A block is pre-norm residual: ``x + mixer(norm(x))``, and for MambaMLP then ``x + SwiGLU(norm(x))``. The mixer
(:class:`MambaMixer`) is Mamba's: an in-projection to ``u, z`` of width ``I = expand * D``, then per *scan* a
causal depthwise conv, SiLU, input-dependent ``delta, B, C`` and the selective scan (:mod:`mal.kernels.ssm`), the
scans' outputs averaged, gated by ``silu(z)`` and projected out. Each scan has its own conv, ``x_proj``,
``dt_proj``, ``A`` and ``D`` (Vim's "bimamba v2", ARM's four-scan layer); in- and out-projections are shared.

Modes, as for ViL and ViT (tokens stay in the layout's canonical order between blocks):

* ``finetune``: Vim's two scans run forward and backward along the canonical order; ARM's four scans add the
  column-major order forward and backward (VMamba's cross scan, as ARM's fine-tuning layer).
* ``pretrain``: every scan used runs **forward** along the cluster-serialized sequence, so a token reads itself
  and the tokens before it: earlier clusters and the earlier tokens of its own cluster (a scan cannot look ahead
  inside a cluster; the layout's ``within_cluster`` must say ``causal``). Vim runs both of its scans forward (every
  weight trains, as both blocks of a ViL pair scan forward); ARM runs its first scan only (the paper's one-scan
  pretraining; the other three start from their initialization in fine-tuning).

``forward_visible`` is the MAE pass (fine-tune scans over the visible tokens). Shapes: ``B`` batch, ``L = Gh * Gw``
tokens, ``D`` width, ``I`` inner width, ``N`` state size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mal.kernels.ssm import selective_scan
from mal.models.base import EncoderClassifier, EncoderConfig, LayoutRecorded, default_pretrained_cfg
from mal.models.layers import DropPath, PatchEmbed, PosEmbed2d
from mal.runtime import retain_freed_memory
from mal.tokens import LayoutOwner, Scan, canonical_visible, keep_before_last_unit, serialize, unserialize

MODES = ("finetune", "pretrain")
NORMS = ("rms", "layer")
PRETRAIN_SCANS = ("all", "first")

try:  # the optional fused causal conv on CUDA (mal-vision[mamba])
    from causal_conv1d import causal_conv1d_fn
except Exception:  # noqa: BLE001 (missing, or built against another torch)
    causal_conv1d_fn = None


@dataclass
class MambaConfig(EncoderConfig):
    """Everything that defines a Mamba encoder (and its classification head): the shared fields of
    :class:`~mal.models.base.EncoderConfig` (``depth`` counts blocks, the unit of layer decay) and the Mamba
    layer's own. :class:`VimConfig` and :class:`ARMConfig` hold the two papers' defaults."""

    family: ClassVar[str] = ""

    d_state: int = 16  # N
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0: ceil(dim / 16), Mamba's "auto"
    finetune_scans: int = 2  # 2: forward + backward (Vim); 4: + column-major forward + backward (ARM)
    pretrain_scans: str = "all"  # which scans run (forward) in pretrain mode: "all" or "first"
    mlp_ratio: float = 0.0  # SwiGLU hidden width = int(dim * mlp_ratio * 2 / 3); 0: no MLP (Vim)
    norm: str = "rms"  # block and final norms: "rms" (Vim) or "layer" (ARM)
    backend: str = "auto"  # selective-scan backend, see mal.kernels.ssm
    scan_chunk: int = 16  # the loop backend's checkpoint interval

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; valid: {', '.join(NORMS)}")
        if self.pretrain_scans not in PRETRAIN_SCANS:
            raise ValueError(f"unknown pretrain_scans {self.pretrain_scans!r}; valid: {', '.join(PRETRAIN_SCANS)}")
        self.check(
            d_state=self.d_state >= 1, d_conv=self.d_conv >= 1, expand=self.expand >= 1, dt_rank=self.dt_rank >= 0,
            finetune_scans=self.finetune_scans in (1, 2, 4), mlp_ratio=self.mlp_ratio >= 0,
            scan_chunk=self.scan_chunk >= 1,
        )  # fmt: skip
        if self.layout.within_cluster != "causal":
            raise ValueError(
                "a Mamba encoder scans token by token: its pretrain mode is causal inside a cluster too; set "
                "layout.within_cluster=causal (got 'full')"
            )
        if self.layout.finetune_cell != "causal":
            raise ValueError("finetune_cell applies to ViL's mLSTM cell; a Mamba encoder's scans are plain")

    @property
    def inner(self) -> int:
        return self.expand * self.dim

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.dim / 16)


@dataclass
class VimConfig(MambaConfig):
    """Vim: Mamba layers of two scans (forward and backward), expand 2, no MLP, RMSNorm."""

    family: ClassVar[str] = "vim"


@dataclass
class ARMConfig(MambaConfig):
    """ARM's MambaMLP: a Mamba layer of expand 1 with four scans in fine-tuning (one in pretraining) and a SwiGLU
    MLP, LayerNorm, ViT's depth and width."""

    family: ClassVar[str] = "arm"

    expand: int = 1
    finetune_scans: int = 4
    pretrain_scans: str = "first"
    mlp_ratio: float = 4.0
    norm: str = "layer"


@dataclass
class ScanRoute:
    """How one scan traverses the canonical sequence: ``perm`` ``(L,)`` or ``(B, L)`` canonical positions in scan
    order (None: the canonical order), then ``reverse`` (scan from the end)."""

    perm: torch.Tensor | None = None
    reverse: bool = False

    def to_scan(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, C)`` canonical -> scan order."""
        x = x if self.perm is None else serialize(x, self.perm)
        return x.flip(1) if self.reverse else x

    def from_scan(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_scan`."""
        x = x.flip(1) if self.reverse else x
        return x if self.perm is None else unserialize(x, self.perm)


def causal_depthwise_conv(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``Conv1d(groups=I)`` of ``u: (B, S, I)`` along ``S``, causal (``t`` reads ``t-k+1 .. t``, zeros before the
    start), with ``weight: (I, 1, k)``, in ``u``'s layout: ``k`` multiply-adds (the depthwise ``conv1d`` of a
    transposed copy was many times slower on the CPU, in float64 by far). Returns ``(B, S, I)``."""
    k = weight.shape[-1]
    S = u.shape[1]
    padded = F.pad(u, (0, 0, k - 1, 0))  # (B, S + k - 1, I)
    w = weight[:, 0].T  # (k, I): tap j multiplies u[t - (k - 1 - j)]
    out = padded[:, k - 1 :] * w[k - 1] if bias is None else torch.addcmul(bias, padded[:, k - 1 :], w[k - 1])
    for j in range(k - 1):
        out = out.addcmul(padded[:, j : j + S], w[j])
    return out


class SelectiveSSM(nn.Module):
    """One scan's own parameters and computation: causal depthwise conv + SiLU on ``u``, ``delta`` (rank ``R``),
    ``B``, ``C`` from ``x_proj``, the selective scan with ``A = -exp(A_log)`` and skip ``D``.
    ``u: (B, S, I)`` in scan order -> ``(B, S, I)``, causal along ``S``."""

    def __init__(self, inner: int, d_state: int, d_conv: int, rank: int) -> None:
        super().__init__()
        self.inner, self.d_state, self.rank = inner, d_state, rank
        self.conv = nn.Conv1d(inner, inner, d_conv, groups=inner, bias=True)
        self.x_proj = nn.Linear(inner, rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(inner, d_state))
        self.D = nn.Parameter(torch.empty(inner))

    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """``mamba_ssm``'s: ``softplus(dt bias)`` log-uniform in ``[dt_min, dt_max]``, ``A = -(1 .. N)`` (S4D real),
        ``D = 1``."""
        self.conv.reset_parameters()
        self.x_proj.reset_parameters()
        with torch.no_grad():
            std = self.rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.inner, -1))
            self.D.fill_(1.0)

    def forward(self, u: torch.Tensor, *, backend: str, chunk_size: int) -> torch.Tensor:
        N, R = self.d_state, self.rank
        if causal_conv1d_fn is not None and u.is_cuda:
            u = causal_conv1d_fn(u.transpose(1, 2), self.conv.weight[:, 0], self.conv.bias, activation="silu")
            u = u.transpose(1, 2)
        else:
            u = F.silu(causal_depthwise_conv(u, self.conv.weight, self.conv.bias))
        dt, B, C = self.x_proj(u).split([R, N, N], dim=-1)  # (B, S, R), (B, S, N), (B, S, N)
        delta = F.softplus(self.dt_proj(dt))  # (B, S, I)
        return selective_scan(u, delta, -torch.exp(self.A_log), B, C, self.D, backend=backend, chunk_size=chunk_size)


class MambaMixer(nn.Module):
    """Mamba's layer with ``num_scans`` scans: ``x: (B, L, D)`` canonical -> ``(B, L, D)``. ``routes`` say how
    each scan used traverses the sequence (scan ``i`` uses ``scans[i]``); their outputs are averaged (Vim's
    ``if_devide_out``, ARM's ``/ 4``) before the ``silu(z)`` gate."""

    def __init__(
        self, dim: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2, rank: int | None = None,
        num_scans: int = 1, num_layers: int = 1,
    ) -> None:  # fmt: skip
        super().__init__()
        self.inner, self.num_layers = expand * dim, num_layers
        rank = rank or math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * self.inner, bias=False)
        self.scans = nn.ModuleList(SelectiveSSM(self.inner, d_state, d_conv, rank) for _ in range(num_scans))
        self.out_proj = nn.Linear(self.inner, dim, bias=False)

    def reset_parameters(self) -> None:
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        with torch.no_grad():  # mamba_ssm: residual out-projections scaled by 1 / sqrt(layers) (GPT-2's rescaling)
            self.out_proj.weight /= math.sqrt(self.num_layers)
        for scan in self.scans:
            scan.reset_parameters()

    def forward(
        self, x: torch.Tensor, routes: list[ScanRoute] | None = None, *, backend: str = "auto", chunk_size: int = 16
    ) -> torch.Tensor:
        routes = routes or [ScanRoute()]
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, L, I) each
        y = None
        for scan, route in zip(self.scans, routes, strict=False):
            out = route.from_scan(scan(route.to_scan(u), backend=backend, chunk_size=chunk_size))
            y = out if y is None else y + out
        if len(routes) > 1:
            y = y / len(routes)
        return self.out_proj(y * F.silu(z))


class SwiGLU(nn.Module):
    """``w3(silu(w1 x) * w2 x)`` (ARM's MLP, with biases). ``(..., D) -> (..., D)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def make_norm(kind: str, dim: int) -> nn.Module:
    return nn.RMSNorm(dim, eps=1e-5) if kind == "rms" else nn.LayerNorm(dim, eps=1e-5)


class MambaEncoderBlock(nn.Module):
    """``x + DropPath(mixer(norm(x)))``, then ``x + DropPath(mlp(norm2(x)))`` with an MLP.
    ``(B, L, D) -> (B, L, D)``."""

    def __init__(self, cfg: MambaConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm = make_norm(cfg.norm, cfg.dim)
        self.mixer = MambaMixer(
            cfg.dim, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, rank=cfg.rank,
            num_scans=cfg.finetune_scans, num_layers=cfg.depth,
        )  # fmt: skip
        hidden = int(cfg.dim * cfg.mlp_ratio * 2 / 3)
        self.norm2 = make_norm(cfg.norm, cfg.dim) if hidden else None
        self.mlp = SwiGLU(cfg.dim, hidden) if hidden else None
        self.drop_path = DropPath(drop_path)

    def reset_parameters(self) -> None:
        for norm in (self.norm, self.norm2):
            if norm is not None:
                norm.reset_parameters()
        self.mixer.reset_parameters()
        if self.mlp is not None:
            for lin in (self.mlp.w1, self.mlp.w2, self.mlp.w3):
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, routes: list[ScanRoute]) -> torch.Tensor:
        x = x + self.drop_path(
            self.mixer(self.norm(x), routes, backend=self.cfg.backend, chunk_size=self.cfg.scan_chunk)
        )
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class MambaEncoder(LayoutOwner, LayoutRecorded, nn.Module):
    """Patch embedding + 2-D position embedding + ``depth`` Mamba blocks + final norm.

    ``forward(x: (B, C, H, W), mode) -> (B, L, D)`` in the canonical serialized order of the layout, like
    :class:`~mal.models.vil.ViLEncoder` (same ``forward_intermediates`` / ``forward_visible`` interface).
    """

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        retain_freed_memory()  # CPU speed as a library user meets it; process-wide, see mal.runtime
        self.cfg = cfg = cfg.resolved()
        self.pretrained_cfg = default_pretrained_cfg(cfg)
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.dim, cfg.patch_size)
        self.pos_embed = PosEmbed2d(cfg.grid, cfg.dim)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist() if cfg.drop_path_decay else None
        self.blocks = nn.ModuleList(
            MambaEncoderBlock(cfg, dpr[i] if dpr else cfg.drop_path_rate) for i in range(cfg.depth)
        )
        self.norm = make_norm(cfg.norm, cfg.dim)
        self.schedule = cfg.layout.schedule(cfg.depth)
        self._columns: dict[tuple[int, int], torch.Tensor] = {}
        self._record_layout()
        self.reset_parameters()
        _ = self.layout  # built eagerly now (index tensors), so that export at this resolution traces no planning

    def reset_parameters(self) -> None:
        self.patch_embed.reset_parameters()
        self.pos_embed.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()
        self.norm.reset_parameters()

    @property
    def num_layers(self) -> int:
        """Mamba blocks (the unit of layer-wise lr decay)."""
        return len(self.blocks)

    def no_weight_decay(self) -> set[str]:
        # mamba_ssm exempts A_log and D: decay would pull the state decay rates towards 1
        own = {f"blocks.{i}.mixer.scans.{j}.{p}" for i, b in enumerate(self.blocks)
               for j in range(len(b.mixer.scans)) for p in ("A_log", "D")}  # fmt: skip
        return {"pos_embed.embed"} | own

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch + position embedding, flattened in raster order. ``(B, C, H, W) -> (B, L, D)``."""
        t = self.pos_embed(self.patch_embed(x))
        return t.flatten(1, 2), (t.shape[1], t.shape[2])

    def _column_ranks(self, grid: tuple[int, int]) -> torch.Tensor:
        """``(L,)`` the column-major rank of every raster index."""
        if grid not in self._columns:
            gh, gw = grid
            raster = torch.arange(gh * gw)
            self._columns[grid] = (raster % gw) * gh + raster // gw
        return self._columns[grid]

    def finetune_routes(self, grid: tuple[int, int], order: torch.Tensor) -> list[ScanRoute]:
        """The fine-tune scans over tokens in canonical order, ``order`` ``(L,)`` or ``(B, L)`` their raster
        indices: forward and backward, then the column-major order forward and backward."""
        routes = [ScanRoute(), ScanRoute(reverse=True)][: self.cfg.finetune_scans]
        if self.cfg.finetune_scans == 4:
            cols = self._column_ranks(grid).to(order.device)[order].argsort(dim=-1)
            routes += [ScanRoute(cols), ScanRoute(cols, reverse=True)]
        return routes

    def pretrain_routes(self) -> list[ScanRoute]:
        """Every scan used runs forward along the cluster-serialized sequence."""
        return [ScanRoute()] * (self.cfg.finetune_scans if self.cfg.pretrain_scans == "all" else 1)

    def sequence_plan(
        self, grid: tuple[int, int], mode: str, scan: Scan | None, batch_size: int, drop_last_unit: bool = False
    ) -> tuple[torch.Tensor, list[ScanRoute], int | None]:
        """``(order, routes, keep)``: raster index of each canonical position ``(L,)`` or ``(B, L)``; the scans'
        routes; the number of positions computed (``None``: all; pretraining may skip the last unit, which no
        earlier token reads)."""
        if mode not in MODES:
            raise ValueError(f"unknown encoder mode {mode!r}; valid modes: {', '.join(MODES)}")
        layout = self.layout_for(grid)
        if mode == "finetune":
            return layout.order, self.finetune_routes(grid, layout.order), None
        if scan is None:
            scan = layout.draw(batch_size)  # random orders draw from torch's global RNG
        elif (scan.grid_h, scan.grid_w) != tuple(grid):
            raise ValueError(f"scan is for a {scan.grid_h}x{scan.grid_w} grid, the input has {grid[0]}x{grid[1]}")
        fixed = layout.cluster_order != "random"
        units = scan.unit_ids[:1] if fixed else scan.unit_ids
        keep = keep_before_last_unit(units) if drop_last_unit else None
        return (scan.order[0] if fixed else scan.order), self.pretrain_routes(), keep

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: list[int] | None = None,
        *,
        mode: str = "finetune",
        scan: Scan | None = None,
        drop_last_unit: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final features ``(B, L, D)`` and the outputs of the blocks in ``indices`` (before the final norm), all
        in canonical order; as :meth:`mal.models.vil.ViLEncoder.forward_intermediates`."""
        t, grid = self.embed(x)
        order, routes, keep = self.sequence_plan(grid, mode, scan, x.shape[0], drop_last_unit)
        t = serialize(t, order.to(x.device))
        if keep is not None:
            t = t[:, :keep].contiguous()
        return self.run_blocks(t, indices, routes)

    def forward_visible(self, x: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The MAE encoder pass on the visible patches only, ``visible: (B, Lv)`` raster indices: the fine-tune
        scans over the shorter sequence in canonical scan order. Returns the features ``(B, Lv, D)`` and the raster
        index ``(B, Lv)`` of each output token."""
        t, grid = self.embed(x)
        visible = canonical_visible(self.layout_for(grid).order.to(x.device), visible)
        t = t.gather(1, visible[..., None].expand(-1, -1, t.shape[-1]))
        return self.run_blocks(t, None, self.finetune_routes(grid, visible))[0], visible

    def forward(self, x: torch.Tensor, mode: str = "finetune", scan: Scan | None = None) -> torch.Tensor:
        """``(B, C, H, W) -> (B, L, D)``; ``mode="pretrain"`` is causal along the cluster-serialized sequence."""
        return self.forward_intermediates(x, None, mode=mode, scan=scan)[0]


class MambaClassifier(EncoderClassifier):
    """Mamba encoder + mean of the tokens + linear head (Vim's middle class token has no place in a cluster-
    serialized sequence; ARM's code offers the same mean pooling). ``forward(x: (B, C, H, W)) -> (B, num_classes)``."""

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.encoder = MambaEncoder(cfg)
        self.cfg = cfg = self.encoder.cfg
        self.head = self.make_head(self.head_hidden_size, cfg.num_classes)

    @property
    def head_hidden_size(self) -> int:
        return self.cfg.dim

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L, D) -> (B, D)``."""
        return tokens.mean(dim=1)
