"""ViL encoder: parity with the official implementation, sizes, registry, resizing and bad input."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import mal
from helpers import FIXTURES
from mal.models import ViLConfig, create_encoder, create_model, list_models, model_config, vil_from_official
from mal.models.layers import BlockDiagonalLinear, DropPath, resize_pos_embed
from mal.models.vil import ViLClassifier, depthwise_conv

FIXTURE = FIXTURES / "vil2_mini.safetensors"


@pytest.fixture(scope="module")
def official():
    tensors = load_file(FIXTURE)
    state = {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}
    meta = safe_open(FIXTURE, "pt").metadata()
    return state, tensors, meta


def _load(state, **kw):
    return vil_from_official(dict(state), image_size=32, patch_size=4, num_classes=10, **kw)


@pytest.mark.parametrize("backend", ["parallel", "chunkwise", "recurrent"])
def test_official_fixture_logits_and_features_match(official, backend):
    state, tensors, meta = official
    assert meta["pooling"] == "bilateral_flatten" and meta["legacy_norm"] == "False"
    model = _load(state, backend=backend, chunk_size=16)
    with torch.no_grad():
        logits = model(tensors["input"])
        feats = model.forward_features(tensors["input"])
    assert feats.shape == tensors["features"].shape == (2, 64, 64)
    torch.testing.assert_close(logits, tensors["logits"], atol=2e-5, rtol=0)
    torch.testing.assert_close(feats, tensors["features"], atol=2e-5, rtol=0)


def test_official_fixture_float64_is_closer_than_float32_tolerance(official):
    state, tensors, _ = official
    model = _load(state).double()
    with torch.no_grad():
        logits = model(tensors["input"].double())
    # the reference itself is float32: float64 must agree to the reference's own round-off
    torch.testing.assert_close(logits, tensors["logits"].double(), atol=1e-5, rtol=0)


def test_official_loader_infers_dims_and_is_strict(official):
    state, _, _ = official
    model = _load(state)
    assert model.cfg.dim == 64 and model.cfg.depth == 2 and model.cfg.in_chans == 3
    bad = dict(state)
    bad["blocks.0.rowwise_from_top_left.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra"):
        _load(bad)
    with pytest.raises(ValueError, match="unexpected key 'mystery'"):
        _load({**state, "mystery": torch.zeros(1)})
    with pytest.raises(ValueError, match="patch_size=8"):
        vil_from_official(dict(state), image_size=32, patch_size=8, num_classes=10)


def test_official_weights_at_another_resolution_resize_the_position_embedding(official):
    state, tensors, _ = official
    model = vil_from_official(dict(state), image_size=48, patch_size=4, num_classes=10)
    expected = resize_pos_embed(state["pos_embed.embed"], (12, 12))
    torch.testing.assert_close(model.encoder.pos_embed.embed.data, expected)
    x = F.interpolate(tensors["input"], size=48, mode="bilinear")
    # a model built at 32 px resizes on the fly: same result as the model built at 48 px
    small = _load(state)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)


def test_resize_pos_embed_is_bicubic_without_align_corners():
    embed = torch.randn(1, 4, 4, 3)
    out = resize_pos_embed(embed, (6, 5))
    ref = F.interpolate(embed.permute(0, 3, 1, 2), size=(6, 5), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1))
    assert resize_pos_embed(embed, (4, 4)) is embed


def test_parameter_counts_of_the_paper_sizes():
    counts = {n: sum(p.numel() for p in create_model(n).parameters()) for n in ("vil_tiny", "vil_small", "vil_base")}
    # the official code's counts (1000 classes, 224 px; docs/DESIGN.md, 'The ViL encoder')
    assert counts == {"vil_tiny": 6_390_760, "vil_small": 23_397_160, "vil_base": 89_260_456}
    for name, target in (("vil_tiny", 6.4e6), ("vil_small", 23e6), ("vil_base", 89e6)):
        assert abs(counts[name] - target) / target < 0.02


def test_block_parameter_formula():
    D = 96
    block = create_model("vil_micro").encoder.blocks[0].fwd
    assert sum(p.numel() for p in block.parameters()) == 6 * D * D + 111 * D + 8


def test_registry_lists_and_builds_models():
    names = list_models()
    assert {"vil_micro", "vil_tiny", "vil_small", "vil_base", "mal_micro", "mal_tiny"} <= set(names)
    model = mal.create_model("vil_micro", num_classes=7, image_size=32, patch_size=4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    enc = create_encoder("vil_micro", image_size=32, patch_size=4)
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, 64, 96)


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown model 'vil_tinyy' \(did you mean vil_tiny"):
        create_model("vil_tinyy")
    with pytest.raises(ValueError, match="unknown option.*widht"):
        model_config("vil_tiny", widht=3)


def test_bad_input_errors_name_the_problem():
    model = create_model("vil_micro", image_size=32, patch_size=4, num_classes=3)
    with pytest.raises(ValueError, match="image size 30x32 is not divisible by the patch size 4"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="unknown encoder mode 'train'"):
        model.encoder(torch.randn(1, 3, 32, 32), mode="train")
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        _ = ViLConfig(image_size=30, patch_size=4).grid


def test_init_follows_the_official_recipe():
    torch.manual_seed(0)
    model = create_model("vil_tiny")
    cell = model.encoder.blocks[3].bwd.layer.mlstm_cell
    torch.testing.assert_close(cell.fgate.bias.data, torch.linspace(3.0, 6.0, 4))
    assert cell.fgate.weight.abs().max() == 0 and cell.igate.weight.abs().max() == 0
    assert 0.03 < cell.igate.bias.std() < 0.3
    layer = model.encoder.blocks[0].fwd.layer
    D = 192
    for w, std in (
        (layer.proj_up.weight, (2 / (5 * D)) ** 0.5),  # small init
        (layer.q_proj.weight, (2 / (5 * D)) ** 0.5),  # small init with D, not the inner width
        (layer.proj_down.weight, 2 / D**0.5),  # wang init
        (model.head.weight, 2e-5),
    ):
        assert abs(w.std().item() / std - 1) < 0.1
    assert torch.equal(layer.learnable_skip.data, torch.ones(384))


@pytest.mark.parametrize("method", ["bmm", "channels_first", "chain", "dense"])
@pytest.mark.parametrize("dim", [12, BlockDiagonalLinear.DENSE_MAX_DIM + 4])
def test_block_diagonal_linear_equals_dense_block_diag(dim, method):
    lin = BlockDiagonalLinear(dim, 4).double()
    torch.nn.init.normal_(lin.weight)
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(2, 5, dim, dtype=torch.float64, requires_grad=True)
    dense = torch.block_diag(*lin.weight.detach())  # (dim, dim): out = x @ dense.T
    assert lin.method(x) == "bmm"  # the CPU form for token-major inputs
    assert lin.method(x.detach().mT.contiguous().mT) == "channels_first"  # and for channels-first memory
    out = lin(x, method)
    torch.testing.assert_close(out, x @ dense.T + lin.bias)
    (gw,) = torch.autograd.grad(out.square().sum(), lin.weight)
    # the gradient reaches the blocks only: block i's gradient is (dout_i)^T x_i
    dout, xb = (2 * out).detach().reshape(10, dim // 4, 4), x.detach().reshape(10, dim // 4, 4)
    torch.testing.assert_close(gw, torch.einsum("nbo,nbi->boi", dout, xb))
    (gx,) = torch.autograd.grad(lin(x, method).sum(), x)
    torch.testing.assert_close(gx, torch.ones(2, 5, dim, dtype=torch.float64) @ dense)


def test_gates_by_parts_equal_the_product_on_the_concatenation():
    from mal.models.vil import MatrixLSTMCell

    cell = MatrixLSTMCell(12, 3).double()
    for lin in (cell.igate, cell.fgate):
        torch.nn.init.normal_(lin.weight)
        torch.nn.init.normal_(lin.bias)
    q, k, v = (torch.randn(2, 5, 12, dtype=torch.float64) for _ in range(3))
    ig, fg = cell.gates(q, k, v, by_parts=True)
    qkv = torch.cat([q, k, v], dim=-1)
    torch.testing.assert_close(ig, cell.igate(qkv).transpose(1, 2))
    torch.testing.assert_close(fg, cell.fgate(qkv).transpose(1, 2))
    for a, b in zip((ig, fg), cell.gates(q, k, v, by_parts=False), strict=True):
        torch.testing.assert_close(a, b)


def test_channels_first_inputs_give_the_same_projections_and_gates():
    from mal.models.vil import MatrixLSTMCell

    lin = BlockDiagonalLinear(12, 4).double()
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    x_cf = x.mT.contiguous().mT  # same values, (B, C, L) memory
    out = lin(x_cf)
    assert out.mT.is_contiguous()  # the output keeps the layout
    torch.testing.assert_close(out, lin(x, "bmm"))
    cell = MatrixLSTMCell(12, 3).double()
    for gate in (cell.igate, cell.fgate):
        torch.nn.init.normal_(gate.weight)
        torch.nn.init.normal_(gate.bias)
    q, k, v = (torch.randn(2, 5, 12, dtype=torch.float64) for _ in range(3))
    cf = [t.mT.contiguous().mT for t in (q, k, v)]
    for a, b in zip(cell.gates(*cf), cell.gates(q, k, v, by_parts=False), strict=True):
        torch.testing.assert_close(a, b)


def test_block_diagonal_bmm_in_token_slices_equals_one_bmm(monkeypatch):
    lin = BlockDiagonalLinear(12, 4).double()
    torch.nn.init.normal_(lin.weight)
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(3, 7, 12, dtype=torch.float64, requires_grad=True)  # 21 tokens
    ref = lin(x, "bmm")
    g_ref = torch.autograd.grad(ref.square().sum(), (x, lin.weight, lin.bias))
    monkeypatch.setattr(BlockDiagonalLinear, "BMM_ROWS_SPLIT", 8)
    monkeypatch.setattr(BlockDiagonalLinear, "BMM_ROWS", 5)  # 5 slices, the last one short
    out = lin(x, "bmm")
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.square().sum(), (x, lin.weight, lin.bias)), g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_block_diagonal_linear_names_an_unknown_method():
    with pytest.raises(ValueError, match="unknown block-diagonal method 'einsum'"):
        BlockDiagonalLinear(8, 4)(torch.randn(2, 8), "einsum")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_masked_depthwise_conv_gradients(per_sample, bias, channels_last):
    """The hand-written backward of the masked conv: torch.autograd.gradcheck (float64), and the same outputs and
    gradients as the formula differentiated by autograd; inputs in both memory formats (the ViL layer gives
    channels-last ones, where a shared mask is folded into weights of that format)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(3, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    valid = torch.rand(2 if per_sample else 1, 9, 5, 4, generator=g) > 0.3
    inputs = (x, w) if b is None else (x, w, b)
    assert torch.autograd.gradcheck(lambda x, w, b=None: depthwise_conv(x, w, b, valid), inputs)

    def by_autograd(x, w, b):
        xp, mask = F.pad(x, (1, 1, 1, 1)), valid.to(x.dtype)
        out = sum(xp[:, :, dy : dy + 5, dx : dx + 4] * w[:, 0, dy, dx].view(1, 3, 1, 1) * mask[:, 3 * dy + dx, None]
                  for dy in range(3) for dx in range(3))  # fmt: skip
        return out if b is None else out + b.view(1, 3, 1, 1)

    up = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
    ours, ref = depthwise_conv(x, w, b, valid), by_autograd(x, w, b)
    torch.testing.assert_close(ours, ref)
    for a, e in zip(torch.autograd.grad(ours, inputs, up), torch.autograd.grad(ref, inputs, up), strict=True):
        torch.testing.assert_close(a, e)


def test_masked_depthwise_conv_with_all_valid_equals_conv2d():
    x, w, b = torch.randn(2, 6, 5, 7), torch.randn(6, 1, 3, 3), torch.randn(6)
    valid = torch.ones(1, 9, 5, 7, dtype=torch.bool)
    torch.testing.assert_close(depthwise_conv(x, w, b, valid), F.conv2d(x, w, b, padding=1, groups=6))
    # masking the centre tap only removes the centre contribution
    valid[:, 4] = False
    expected = F.conv2d(x, w, b, padding=1, groups=6) - x * w[:, 0, 1, 1].view(1, 6, 1, 1)
    torch.testing.assert_close(depthwise_conv(x, w, b, valid), expected)


def test_drop_path_is_identity_in_eval_and_unbiased_in_train():
    dp = DropPath(0.5)
    x = torch.ones(4000, 3)
    assert torch.equal(dp.eval()(x), x)
    torch.manual_seed(0)
    y = dp.train()(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert abs(y.mean().item() - 1.0) < 0.05
    with pytest.raises(ValueError, match="drop path probability"):
        DropPath(1.0)


def test_backward_gives_finite_gradients_to_every_parameter():
    model = create_model("vil_micro", image_size=32, patch_size=4, num_classes=5, drop_path_rate=0.1)
    model.train()
    # perturb away from init so zero-initialised gate weights also receive gradient through q/k
    loss = F.cross_entropy(model(torch.randn(3, 3, 32, 32)), torch.tensor([0, 1, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_classifier_pools_first_and_last_token():
    model: ViLClassifier = create_model("vil_micro", image_size=16, patch_size=4, num_classes=4).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(x)
        expected = model.head(torch.cat([tokens[:, 0], tokens[:, -1]], dim=-1))
        torch.testing.assert_close(model(x), expected)


_ALLOCATOR_PROBE = """
import ctypes, json, sys
import mal, mal.models, mal.runtime

libc = ctypes.CDLL(None)
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mmapped(nbytes):  # does malloc serve a block of this size with its own mmap? (once: freeing it moves glibc's
    # dynamic threshold)
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(nbytes)
    grew = libc.mallinfo2().hblkhd > before
    libc.free(p)
    return grew

out = {"imported": mal.runtime._applied}
mal.create_model(sys.argv[1])
# under the setting's 32 MiB threshold, above glibc's default one and anything freed while building a model
out["built"] = [mal.runtime._applied, mmapped(24 * 2**20)]
print(json.dumps(out))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's (mallopt)")
@pytest.mark.parametrize("name", ["vil_micro", "vit_micro"])
def test_building_a_model_keeps_freed_memory_unless_turned_off(name):
    def probe(**env: str) -> dict:
        env = {**os.environ, **env}
        code = [sys.executable, "-c", _ALLOCATOR_PROBE, name]
        return json.loads(subprocess.run(code, env=env, capture_output=True, text=True, check=True).stdout)

    default = probe()
    assert default["imported"] is None  # importing mal and mal.models sets nothing
    assert default["built"] == [True, False]  # building a model does: a 24 MiB block comes from the heap
    opted_out = probe(MAL_RETAIN_FREED_MEMORY="0")
    assert opted_out == {"imported": None, "built": [False, True]}  # glibc's default: its own mmap
