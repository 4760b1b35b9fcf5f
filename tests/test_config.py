"""Typed configs: YAML differences, ``_base_`` inheritance, overrides, type checks, saving and hashing."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from mal.config import (
    ConfigError,
    apply_overrides,
    config_hash,
    from_dict,
    load_config,
    load_yaml,
    save_config,
    to_dict,
)


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    schedule: Literal["cosine", "constant"] = "cosine"

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class Data:
    root: str
    crop: int | tuple[int, int] = 224
    classes: str | list[str] = "all"
    num_workers: int = 4


@dataclass
class Train:
    data: Data
    optim: Optim = field(default_factory=Optim)
    epochs: int = 100
    resume: str | None = None
    depths: tuple[int, ...] = (2, 2)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    amp: bool = True


def write(path, text):
    path.write_text(text)
    return path


def test_missing_keys_take_defaults_and_values_are_converted():
    cfg = from_dict(Train, {"data": {"root": "/d", "crop": [160, 192]}, "optim": {"lr": 2, "betas": [0.8, 0.9]}})
    assert cfg.data == Data(root="/d", crop=(160, 192))
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.weight_decay == 0.05
    assert cfg.depths == (2, 2) and cfg.model_kwargs == {} and cfg.resume is None


def test_round_trip_through_to_dict():
    cfg = Train(
        data=Data(root="/d", classes=["cat", "dog"]),
        optim=Optim(lr=3e-4, schedule="constant"),
        resume="ckpt.pt",
        depths=(1, 2, 3),
        model_kwargs={"drop_path": 0.1, "dims": (64, 128)},
        tags=["a"],
        amp=False,
    )
    plain = to_dict(cfg)
    assert plain["optim"] == {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.05, "schedule": "constant"}
    assert plain["depths"] == [1, 2, 3]
    assert plain["model_kwargs"] == {"drop_path": 0.1, "dims": [64, 128]}
    back = from_dict(Train, plain)
    assert back.model_kwargs == {"drop_path": 0.1, "dims": [64, 128]}  # Any values are not converted back
    assert dataclasses.replace(back, model_kwargs=cfg.model_kwargs) == cfg


def test_yaml_file_holds_only_differences(tmp_path):
    path = write(tmp_path / "run.yaml", "data:\n  root: /data\noptim:\n  lr: 1e-4\n  betas: [0.9, 0.99]\nepochs: 3\n")
    cfg = load_config(Train, path)
    assert cfg.data.root == "/data" and cfg.data.crop == 224
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.99) and cfg.optim.schedule == "cosine"
    assert cfg.epochs == 3 and cfg.amp is True


def test_scientific_notation_in_yaml_is_float_but_quoted_strings_stay_strings(tmp_path):
    path = write(tmp_path / "x.yaml", "a: 1e-4\nb: 3E5\nc: -2.5e-3\nd: '1e-4'\ne: 1.5\nf: 7\ng: 1_000\n")
    assert load_yaml(path) == {"a": 1e-4, "b": 3e5, "c": -2.5e-3, "d": "1e-4", "e": 1.5, "f": 7, "g": 1000}


def test_base_inheritance_deep_merges(tmp_path):
    (tmp_path / "base").mkdir()
    write(
        tmp_path / "base" / "common.yaml", "data:\n  root: /data\n  crop: 224\noptim:\n  lr: 0.1\n  weight_decay: 0.3\n"
    )
    write(tmp_path / "base" / "long.yaml", "epochs: 800\ntags: [long]\n")
    path = write(
        tmp_path / "run.yaml",
        "_base_: [base/common.yaml, base/long.yaml]\noptim:\n  lr: 0.01\ntags: [mine]\n",
    )
    assert load_yaml(path) == {
        "data": {"root": "/data", "crop": 224},
        "optim": {"lr": 0.01, "weight_decay": 0.3},
        "epochs": 800,
        "tags": ["mine"],
    }
    child = write(tmp_path / "child.yaml", "_base_: run.yaml\nepochs: 5\n")
    cfg = load_config(Train, child)
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.weight_decay, cfg.tags) == (5, 0.01, 0.3, ["mine"])


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\nepochs: 1\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\nepochs: 2\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        load_yaml(tmp_path / "a.yaml")
    assert "a.yaml" in str(info.value) and "b.yaml" in str(info.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="c.yaml: _base_ 'missing.yaml' is neither a file next to it nor a shipped"):
        load_yaml(write(tmp_path / "c.yaml", "_base_: missing.yaml\n"))
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping, got list"):
        load_yaml(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML") as info:
        load_yaml(write(tmp_path / "bad.yaml", "a: [1, 2\nb: 3\n"))
    assert "line" in str(info.value)
    assert load_yaml(write(tmp_path / "empty.yaml", "")) == {}


def test_overrides():
    data = {"optim": {"lr": 0.1}, "epochs": 3}
    out = apply_overrides(
        data,
        [
            "optim.lr=1e-4",
            "optim.betas=[0.2, 1.0]",
            "model_kwargs.head.dim=64",
            "resume=null",
            "amp=false",
            "data.root=/some/where",
            "tags=",
            "epochs=7",
        ],
    )
    assert out == {
        "optim": {"lr": 0.0001, "betas": [0.2, 1.0]},
        "epochs": 7,
        "model_kwargs": {"head": {"dim": 64}},
        "resume": None,
        "amp": False,
        "data": {"root": "/some/where"},
        "tags": "",
    }
    assert isinstance(out["optim"]["lr"], float)
    assert data == {"optim": {"lr": 0.1}, "epochs": 3}  # the input is not modified
    assert apply_overrides({}, ["x=3E5", "y=-2.5e-3", "z=[unclosed", "w=a=b"]) == {
        "x": 300000.0,
        "y": -0.0025,
        "z": "[unclosed",
        "w": "a=b",
    }


@pytest.mark.parametrize("bad", ["epochs", "=3", "optim..lr=1", "optim.=1"])
def test_malformed_override_is_named(bad):
    with pytest.raises(ConfigError, match="malformed override") as info:
        apply_overrides({}, [bad])
    assert repr(bad) in str(info.value)


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="epochs is not a mapping"):
        apply_overrides({"epochs": 3}, ["epochs.x=1"])


def test_load_config_with_overrides_and_no_file():
    cfg = load_config(Train, None, ["data.root=/r", "optim.lr=1e-4", "depths=[1, 1, 3]", "data.crop=[128, 96]"])
    assert cfg.data.root == "/r" and cfg.optim.lr == 1e-4
    assert cfg.depths == (1, 1, 3) and cfg.data.crop == (128, 96)


def test_unknown_key_names_the_path_and_suggests():
    with pytest.raises(ConfigError) as info:
        from_dict(Train, {"data": {"root": "/d"}, "optim": {"lrr": 0.1}})
    msg = str(info.value)
    assert msg.startswith("optim.lrr: unknown key for Optim")
    assert "valid keys: lr, betas, weight_decay, schedule" in msg
    assert "did you mean 'lr'" in msg


def test_unknown_key_error_mentions_the_file(tmp_path):
    path = write(tmp_path / "run.yaml", "data:\n  root: /d\nepoch: 3\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: epoch: unknown key.*did you mean 'epochs'"):
        load_config(Train, path)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"optim": {"lr": "abc"}}, "optim.lr: expected float, got str ('abc')"),
        ({"optim": {"lr": True}}, "optim.lr: expected float, got bool (True)"),
        ({"epochs": True}, "epochs: expected int, got bool (True)"),
        ({"epochs": 3.0}, "epochs: expected int, got float (3.0)"),
        ({"amp": 1}, "amp: expected bool, got int (1)"),
        ({"optim": {"betas": [0.9]}}, "optim.betas: expected tuple[float, float] (2 items), got 1 items"),
        ({"optim": {"betas": [0.9, "x"]}}, "optim.betas[1]: expected float, got str ('x')"),
        ({"optim": {"schedule": "linear"}}, "optim.schedule: expected one of 'cosine', 'constant', got 'linear'"),
        ({"depths": [1, 2.5]}, "depths[1]: expected int, got float (2.5)"),
        ({"tags": "a"}, "tags: expected list[str], got str ('a')"),
        ({"resume": 3}, "resume: expected str | None, got int (3)"),
        ({"model_kwargs": [1]}, "model_kwargs: expected dict[str, Any], got list ([1])"),
        ({"data": {"root": "/d", "crop": [1, 2, 3]}}, "data.crop: expected int | tuple[int, int], got list"),
        ({"data": {"root": "/d", "classes": ["a", 1]}}, "data.classes[1]: expected str, got int (1)"),
        ({"data": "/d"}, "data: expected Data, got str ('/d')"),
        ({"optim": {"lr": -1}}, "optim: lr must be positive, got -1.0"),
    ],
)
def test_wrong_values_are_rejected_with_their_path(data, fragment):
    data = {"data": {"root": "/d"}, **data}
    with pytest.raises(ConfigError) as info:
        from_dict(Train, data)
    assert fragment in str(info.value)


def test_int_is_accepted_for_float_and_none_for_optional():
    cfg = from_dict(Train, {"data": {"root": "/d"}, "optim": {"lr": 1, "betas": [1, 0]}, "resume": None})
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.optim.betas == (1.0, 0.0) and all(type(b) is float for b in cfg.optim.betas)


def test_missing_required_field():
    with pytest.raises(ConfigError, match=r"^data: missing required value \(Data\)$"):
        from_dict(Train, {})
    with pytest.raises(ConfigError, match=r"^data\.root: missing required value \(str\)$"):
        from_dict(Train, {"data": {}})


def test_save_then_load_gives_an_equal_config(tmp_path):
    cfg = Train(
        data=Data(root="1e-4", crop=(64, 32), classes=["x"]),
        optim=Optim(lr=1e-5, betas=(0.5, 0.5), schedule="constant"),
        resume=None,
        depths=(3,),
        model_kwargs={"a": {"b": [1, 2]}, "c": None},
        tags=["null", "true", "3"],
    )
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]
    assert path.read_text().startswith("data:\n  root: '1e-4'\n")  # field order kept, ambiguous strings quoted
    assert load_config(Train, path) == cfg
    assert config_hash(load_config(Train, path)) == config_hash(cfg)


def test_config_hash_is_stable_and_sensitive():
    a = from_dict(Train, {"data": {"root": "/d"}, "epochs": 3, "model_kwargs": {"x": 1, "y": 2}})
    b = from_dict(Train, {"model_kwargs": {"y": 2, "x": 1}, "epochs": 3, "data": {"root": "/d"}})
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 12 and int(config_hash(a), 16) >= 0
    assert config_hash(dataclasses.replace(a, epochs=4)) != config_hash(a)
    assert config_hash(dataclasses.replace(a, optim=Optim(lr=2e-3))) != config_hash(a)


def test_override_indexes_lists():
    data = {"data": {"mixture": [{"name": "nyuv2", "root": None}, {"name": "ade20k"}]}}
    out = apply_overrides(data, ["data.mixture.0.root=/d/nyu.mat", "data.mixture.1.weight=2"])
    assert out["data"]["mixture"] == [{"name": "nyuv2", "root": "/d/nyu.mat"}, {"name": "ade20k", "weight": 2}]
    assert data["data"]["mixture"][0]["root"] is None  # a copy
    with pytest.raises(ConfigError, match=r"data.mixture is a list of 2; '2' is no index"):
        apply_overrides(data, ["data.mixture.2.root=x"])
    with pytest.raises(ConfigError, match="'root' is no index"):
        apply_overrides(data, ["data.mixture.root=x"])


def test_a_users_config_inherits_a_shipped_config_by_name(tmp_path):
    from mal.finetune.config import load_finetune_config
    from mal.pretrain.task import load_pretrain_config

    # mal_micro_digits is both a pretraining and a fine-tuning config: the kind being loaded picks
    mine = write(tmp_path / "mine.yaml", "_base_: mal_micro_digits\noptim:\n  epochs: 3\n")
    pre = load_pretrain_config(mine)
    assert pre.optim.epochs == 3 and pre.objective.decoder_dim == 128 and pre.model.name == "mal_micro"
    ft = load_finetune_config(mine)
    assert ft.optim.epochs == 3 and ft.init.checkpoint is not None
    by_path = write(tmp_path / "p.yaml", "_base_: configs/pretrain/mal_micro_digits.yaml\n")
    assert load_pretrain_config(by_path).objective.decoder_dim == 128
    with pytest.raises(ConfigError, match="_base_ 'mal_micro_digitz' is neither .* shipped pretrain config"):
        load_pretrain_config(write(tmp_path / "t.yaml", "_base_: mal_micro_digitz\n"))
