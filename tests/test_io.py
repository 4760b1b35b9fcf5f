"""Atomic writes: the target is either the old file or the complete new one, never a partial file."""

from __future__ import annotations

import json

import pytest

from mal.io import atomic_write, write_json


def test_write_json_round_trips(tmp_path):
    path = write_json(tmp_path / "sub" / "result.json", {"a": [1, 2.5]})
    assert json.loads(path.read_text()) == {"a": [1, 2.5]}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary file left behind


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.json"
    write_json(path, {"step": 1})

    def crash(f):
        f.write('{"step": 2, "trunc')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
