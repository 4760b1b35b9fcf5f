"""The decoders of MAL-v2 Table 13 (mLSTM and Mamba next to the Transformer): the shared sequence of memory and
queries, shapes, training, parameter counts, configs and saved runs.
The no-leak tests of every decoder kind are in test_pretrain.py."""

from __future__ import annotations

import pytest
import torch

import mal
from helpers import tiny, with_layout
from mal.cli import main as cli_main
from mal.config import ConfigError
from mal.engine import load_model_state
from mal.engine.optim import param_groups
from mal.pretrain import MALPretrainer, ObjectiveConfig
from mal.pretrain.decoder import ARDecoder
from mal.pretrain.decoders import MambaDecoder, MLSTMDecoder, PaperDecoder, build_decoder, interleave
from mal.pretrain.task import load_pretrain_config, pretrain

KINDS = {"transformer": ARDecoder, "mlstm": MLSTMDecoder, "mamba": MambaDecoder, "paper": PaperDecoder}


def make(kind: str, dtype: torch.dtype = torch.float64, **layout) -> MALPretrainer:
    torch.manual_seed(0)
    size = layout.pop("image_size", 16)
    enc = mal.create_encoder("mal_micro", in_chans=1, dim=32, depth=2, image_size=size, **with_layout(layout))
    objective = ObjectiveConfig(decoder=kind, decoder_dim=32, decoder_depth=2, decoder_heads=4)
    return MALPretrainer(enc, objective).to(dtype)


def test_interleave_puts_the_memory_of_unit_j_before_the_queries_of_unit_j_plus_1():
    # sample 0: 4 units of 2 tokens, memory of units 0..2, queries of units 1..3 (the usual case)
    # sample 1: ragged 3 + 3 + 2, and queries for every position (ragged random batches): unit-0 queries go first
    mem_units = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1]])
    q_units = torch.tensor([[1, 1, 2, 2, 3, 3], [0, 0, 0, 1, 1, 1]])
    mem = torch.arange(6.0).expand(2, -1)[..., None]  # memory token i holds i
    queries = (100 + torch.arange(6.0)).expand(2, -1)[..., None]  # query j holds 100 + j
    x, keys, where = interleave(mem, mem_units, queries, q_units)
    assert x[0, :, 0].tolist() == [0, 1, 100, 101, 2, 3, 102, 103, 4, 5, 104, 105]
    assert keys[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert x[1, :, 0].tolist() == [100, 101, 102, 0, 1, 2, 103, 104, 105, 3, 4, 5]
    assert keys[1].tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(x.gather(1, where[..., None]), queries)  # query_index finds every query
    # a query sees (key <= its own) exactly the memory of earlier units
    for b in range(2):
        for j in range(6):
            seen = x[b, keys[b] <= keys[b, where[b, j]], 0]
            memory_seen = sorted(int(v) for v in seen.tolist() if v < 100)
            assert memory_seen == [i for i in range(6) if mem_units[b, i] < q_units[b, j]]


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_decoder_gives_a_prediction_per_query_and_trains_every_parameter(kind):
    m = make(kind, torch.float32).train()
    assert type(m.decoder) is KINDS[kind]
    x = torch.randn(2, 1, 16, 16)
    out = m(x)
    assert out["pred"].shape == out["target"].shape == (2, 12, 16)  # 4x4 grid in 2x2 clusters, 4x4 px patches
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []
    assert "decoder.query_token" in m.no_weight_decay()


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(kind):
    m = make(kind, torch.float32).train()
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    scan = m.draw_scan(x)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = m(x, scan=scan)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("kind", ["mlstm", "mamba"])
@pytest.mark.parametrize("layout", [{}, {"cluster_order": "random"}, {"image_size": 24, "cluster_size": 4}])
def test_skipping_the_last_unit_gives_the_recurrent_decoders_the_same_loss(kind, layout):
    m = make(kind, **layout)
    x = torch.randn(3, 1, layout.get("image_size", 16), layout.get("image_size", 16), dtype=torch.float64)
    scan = m.draw_scan(x, generator=torch.Generator().manual_seed(2))
    a = m(x, scan=scan)["loss"]
    short = m.forward_encoder(x, scan)[0].shape[1]
    m.cfg.skip_last_unit = False  # the last unit's memory comes after every query: read by none
    assert m.forward_encoder(x, scan)[0].shape[1] > short
    torch.testing.assert_close(m(x, scan=scan)["loss"], a, rtol=1e-10, atol=1e-10)


def test_parameter_counts_are_comparable_at_the_digits_size():
    # configs/pretrain/mal_micro_digits.yaml: encoder width 96, decoder 128 x 2 with 4 heads, 4x4 px grey patches
    counts = {
        kind: sum(p.numel() for p in build_decoder(kind, 96, 16, dim=128, depth=2, num_heads=4).parameters())
        for kind in KINDS
    }
    assert counts == {"transformer": 544_016, "mlstm": 459_824, "mamba": 481_296, "paper": 427_664}
    for kind in ("mlstm", "mamba"):  # a block pair (~12 E^2) per Transformer block (~16 E^2)
        assert 0.8 < counts[kind] / counts["transformer"] < 1.0


def test_mamba_state_decay_rates_are_not_weight_decayed():
    m = make("mamba", torch.float32)
    no_decay = {n for g in param_groups(m, 0.05) if g["weight_decay"] == 0 for n in g["names"]}
    a_logs = {n for n, _ in m.named_parameters() if n.endswith("A_log")}
    assert len(a_logs) == 4 and a_logs <= no_decay
    assert "decoder.blocks.0.mixer.scans.0.x_proj.weight" in {n for n, _ in m.named_parameters()}
    assert "decoder.blocks.0.mixer.scans.0.x_proj.weight" not in no_decay


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["objective.decoder=lstm"], "objective.decoder: expected one of 'transformer', 'mlstm', 'mamba'"),
        (["objective.decoder=mamba", "objective.memory=taps"], "reads the last encoder block"),
        (["objective.decoder=mlstm", "objective.method=mae"], "MAE's decoder is a Transformer"),
        (["objective.decoder=mlstm", "objective.decoder_heads=3"], "not divisible by decoder_heads = 3"),
    ],
)
def test_bad_decoder_choices_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_pretrain_config(None, overrides)


def test_print_config_names_the_decoder_and_refuses_an_unknown_one(capsys):
    assert cli_main(["pretrain", "--config", "mal_micro_digits", "--print-config", "objective.decoder=mamba"]) == 0
    assert "decoder: mamba" in capsys.readouterr().out
    assert cli_main(["pretrain", "--config", "mal_micro_digits", "--print-config", "objective.decoder=rnn"]) == 2
    err = capsys.readouterr().err
    assert "objective.decoder" in err and "'mlstm'" in err and "'rnn'" in err


@pytest.mark.parametrize("kind", ["mlstm", "mamba"])
def test_load_model_rebuilds_a_run_pretrained_with_each_decoder(kind, tmp_path):
    pretrain(tiny(tmp_path, f"objective.decoder={kind}", "optim.max_steps=2"))
    full = mal.load_model(tmp_path / "run", decoder=True)
    assert isinstance(full, MALPretrainer) and full.cfg.decoder == kind and type(full.decoder) is KINDS[kind]
    state = load_model_state(tmp_path / "run")
    assert set(full.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in full.state_dict().items())
    x = torch.randn(2, 1, 16, 16)
    scan = full.draw_scan(x)
    assert torch.isfinite(full(x, scan=scan)["loss"])
