"""``compile_blocks``: each encoder block compiled in place (the GPU path of the block around the mLSTM cell),
checked on CPU against the eager model: outputs and gradients, fine-tuning and the cluster-causal pretraining
mode, ViL and ViT; the training engine's ``run.compile=blocks``.

The comparisons run in float64: a freshly initialized encoder's float32 gradients are already up to 10 % away
from float64 in eager mode (exponential gates, normalisers), so float32 would test round-off, not the graphs."""

from __future__ import annotations

import pytest
import torch

import mal
from helpers import tiny
from mal.config import ConfigError
from mal.pretrain.task import pretrain

pytestmark = pytest.mark.slow  # compiling takes tens of seconds on CPU


def _pair(name: str, **kw):  # noqa: ANN202 (two models with the same weights)
    torch.manual_seed(0)
    eager = mal.create_model(name, num_classes=10, in_chans=1, **kw).double()
    compiled = mal.create_model(name, num_classes=10, in_chans=1, **kw).double()
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def _assert_same_grads(compiled, eager) -> None:  # noqa: ANN001
    """Equal to float64 round-off, relative to each gradient's scale."""
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        err = float((a.grad - b.grad).abs().max())
        assert err <= 1e-9 * float(b.grad.abs().max()) + 1e-15, (name, err)


@pytest.mark.parametrize("name", ["mal_micro", "vit_micro", "arm_micro"])
def test_compiled_blocks_equal_the_eager_model(name):
    eager, compiled = _pair(name, patch_size=4, image_size=32)
    keys = list(compiled.state_dict())
    assert mal.compile_blocks(compiled) == compiled.encoder.cfg.depth
    assert list(compiled.state_dict()) == keys  # in place: weights save and load as before
    x = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    for model in (eager, compiled):
        model(x).square().sum().backward()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-10, atol=1e-12)
    _assert_same_grads(compiled, eager)


def test_compiled_blocks_keep_the_cluster_causal_pretraining_mode():
    """Pretrain mode (segments, masked conv) and a per-sample random cluster order through the compiled blocks."""
    eager, compiled = _pair("mal_micro", layout={"cluster_order": "random"})
    mal.compile_blocks(compiled)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    scan = eager.encoder.draw_scan(2)
    outs = []
    for model in (eager, compiled):
        out = model.encoder(x, mode="pretrain", scan=scan)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
    _assert_same_grads(compiled.encoder, eager.encoder)


def test_the_engine_compiles_the_blocks(tmp_path):
    result = pretrain(tiny(tmp_path, "optim.max_steps=2", "run.compile=blocks"))
    assert result.finished and result.step == 2
    with pytest.raises(ConfigError, match="run.compile"):
        tiny(tmp_path, "run.compile=layers")
