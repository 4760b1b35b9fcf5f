"""The ``mal`` command as a newcomer meets it: version, the shipped configs by name from any folder, a clear stop
when a config is missing, where a run's outputs are."""

from __future__ import annotations

import pytest

from helpers import TINY
from mal.cli import main as cli_main


def test_version_and_help_answer(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("mal 0.")


def test_configs_are_listed_and_found_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no checkout here
    assert cli_main(["configs"]) == 0
    listed = capsys.readouterr().out
    for name in ("mal_micro_digits", "mal_tiny_imagenet", "demo", "cluster_size"):
        assert name in listed
    assert "_digits" not in listed.split()  # bases are not configs
    assert cli_main(["pretrain", "--config", "mal_micro_digits", "--print-config"]) == 0
    assert "cluster_size: 4" in capsys.readouterr().out
    assert cli_main(["finetune", "--config", "mal_micro_digits", "--print-config"]) == 0
    assert "label_fraction: 0.1" in capsys.readouterr().out  # the fine-tuning config of that name
    assert cli_main(["pretrain", "--config", "configs/pretrain/mal_micro_digits.yaml", "--print-config"]) == 0
    assert cli_main(["sweep", "--config", "cluster_size", "--print-config"]) == 0


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_missing_or_unknown_config_stops_at_once_with_the_list(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli_main([command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--config is required" in err[0] and "mal_micro_digits" in err[0]
    assert not (tmp_path / "runs").exists()
    assert cli_main([command, "--config", "mal_micro_digitz"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config file not found" in err[0] and "mal_micro_digits" in err[0]


def test_a_run_ends_with_where_its_outputs_are(tmp_path, capsys):
    assert cli_main(["pretrain", *TINY, "optim.max_steps=2", "run.image_every=2", f"run.out_dir={tmp_path / 'r'}"]) == 0
    out = capsys.readouterr().out
    assert f"outputs in {tmp_path / 'r'}/" in out and "metrics.jsonl" in out and "images" in out
    assert "mal.load_model" in out
