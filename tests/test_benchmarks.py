"""Smoke tests of the benchmark scripts: their ``--quick`` modes (a subset of the cases, to stay within about 20 s
on two cores) run end to end in a subprocess and write the JSON that the docs read.

One thread per case: with two threads on a machine whose cores are busy, OpenMP's spin-waiting makes a smoke
case up to 100x slower."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmark subprocesses

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, out: Path, *args: str) -> dict:
    cmd = [sys.executable, str(BENCHMARKS / name), "--quick", "--threads", "1", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"wrote {out}" in proc.stdout
    return json.loads(out.read_text()) | {"stdout": proc.stdout}


def assert_speed(row: dict) -> None:
    assert not row["oom"]
    assert math.isfinite(row["img_per_s"]) and row["img_per_s"] > 0
    assert math.isclose(row["ms_per_img"], 1000 / row["img_per_s"])
    assert row["peak_mem_mb"] > 0 and row["peak_rss_mb"] > 0


def test_resolution_scaling_quick(tmp_path):
    out = tmp_path / "resolution_scaling.json"
    result = run_script("resolution_scaling.py", out, "--backends", "chunkwise")
    assert result["benchmark"] == "resolution_scaling"
    assert {"platform", "torch", "threads", "device"} <= set(result["machine"])
    assert result["machine"]["threads"] == 1
    settings = result["settings"]
    assert settings["quick"] and settings["images"] == [64, 128] and settings["batch"] == 2
    rows = result["rows"]
    cases = [(r["model"], r["backend"], r["image"], r["tokens"]) for r in rows]
    assert cases == [
        ("vil_micro", "chunkwise", 64, 16),
        ("vil_micro", "chunkwise", 128, 64),
        ("vit_micro", None, 64, 16),
        ("vit_micro", None, 128, 64),
    ]
    for r in rows:
        assert_speed(r)
        assert r["batch"] == 2 and r["layout"] == "raster" and r["ref_image"] == 64
        assert r["cost_vs_ref"] > 0 and math.isfinite(r["cost_vs_ref"])
    assert [r["cost_vs_ref"] for r in rows if r["image"] == 64] == [1.0, 1.0]
    # micro ViL (4 pairs) and micro ViT (4 blocks) at the same width and patch size: comparable sizes
    vil, vit = rows[0]["params_m"], rows[2]["params_m"]
    assert 0.5 < vil / vit < 2
    summary = {(s["model"], s["backend"]): s for s in result["summary"]}
    assert set(summary) == {("vil_micro", "chunkwise"), ("vit_micro", None)}
    for s in summary.values():
        assert s["images"] == [64, 128] and s["token_ratio"] == 4.0
        assert s["cost_ratio"] > 0 and math.isfinite(s["token_exponent"])
    table = result["stdout"]
    assert "| model | backend | image | tokens | batch | img/s | ms/img | cost vs 64 px |" in table
    assert "vil_micro chunkwise: cost(128)/cost(64) = " in table and "vit_micro: cost(128)/cost(64) = " in table


def test_pretrain_speed_quick(tmp_path):
    out = tmp_path / "pretrain_speed.json"
    result = run_script(
        "pretrain_speed.py", out, "--cases", "supervised", "mae", "vit_pretrain", "--decoders", "default"
    )
    assert result["benchmark"] == "pretrain_speed"
    assert result["settings"]["quick"] and result["settings"]["image"] == 64
    assert result["settings"]["cases"] == ["supervised", "mae", "vit_pretrain"]
    rows = result["rows"]
    assert [(r["kind"], r["model"], r["decoder"]) for r in rows] == [
        ("supervised", "vil_tiny", None),
        ("mae", "mal_tiny", [512, 8, 16]),
        ("vit_pretrain", "vit_tiny", [512, 8, 16]),
    ]
    for r in rows:
        assert_speed(r)
        assert math.isfinite(r["loss"]) and r["gflop_per_img"] > 0
        # the original keys, still relative to the ViL supervised step
        assert r["cost_ratio_vs_supervised"] > 0 and r["flop_ratio_vs_supervised"] > 0
    sup, mae, vit = rows
    assert sup["cost_ratio_vs_supervised"] == sup["cost_ratio_vs_own_supervised"] == 1.0
    assert mae["cost_ratio_vs_own_supervised"] == mae["cost_ratio_vs_supervised"]
    assert mae["decoder_gflop_per_img"] > mae["encoder_gflop_per_img"] > 0  # the encoder sees 25 % of the patches
    assert vit["cost_ratio_vs_own_supervised"] is None  # vit_supervised did not run
    summary = result["summary"]
    assert summary["supervised_ms_per_img"] == sup["ms_per_img"] and summary["vit_supervised_ms_per_img"] is None
    assert summary["default_decoder_ratio"] is None and summary["decoders_meeting_goal"] == []  # no "pretrain" case
    assert set(summary["cost_ratio_vs_own_supervised"]) == {
        "supervised",
        "mae 512x8, 16 heads",
        "vit_pretrain 512x8, 16 heads",
    }
    assert "| case " in result["stdout"] and "mae (default decoder): " in result["stdout"]


FAKE_OFFICIAL = """
import torch
from torch import nn


class VisionLSTM2(nn.Module):  # stands in for NX-AI's class: same constructor arguments, a classifier
    def __init__(self, dim, depth, patch_size, input_shape, output_shape, mode, pooling):
        super().__init__()
        assert mode == "classifier" and pooling == "bilateral_flatten"
        self.embed = nn.Conv2d(input_shape[0], dim, patch_size, stride=patch_size)
        self.head = nn.Linear(dim, output_shape[0])

    def forward(self, x):
        return self.head(self.embed(x).flatten(2).mean(-1))
"""


def test_encoder_speed_pairs_rounds_with_the_official_model(tmp_path):
    pkg = tmp_path / "vision-lstm" / "vision_lstm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_OFFICIAL)
    out = tmp_path / "encoder_speed.json"
    args = ["--only-paired", "--official", str(pkg.parent), "--model", "vil_micro", "--batch", "2", "--rounds", "3"]
    result = run_script("encoder_speed.py", out, *args)
    vs = result["vs_official"]
    assert vs["rounds"] == 3 and len(vs["img_per_s_official"]) == len(vs["img_per_s_ours"]) == 3
    ratios = sorted(a / b for a, b in zip(vs["img_per_s_ours"], vs["img_per_s_official"], strict=True))
    assert math.isclose(vs["ratio_median"], ratios[1]) and vs["ratio_min"] == ratios[0] and vs["ratio_max"] == ratios[2]
    assert result["rows"] == [] and result["summary"]["vs_official_ratio_median"] == vs["ratio_median"]
    assert "vs official VisionLSTM2, 224 px" in result["stdout"]
    # and again in a process that opted out of kept freed memory
    assert_both_allocators(result, "vs_official")
    # a folder that is not a checkout: a clear error, not a traceback from an import
    cmd = [sys.executable, str(BENCHMARKS / "encoder_speed.py"), "--only-paired", "--official", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "not a checkout of NX-AI/vision-lstm" in proc.stderr


def test_encoder_speed_pairs_rounds_of_two_resolutions(tmp_path):
    out = tmp_path / "encoder_speed.json"
    result = run_script("encoder_speed.py", out, "--only-paired", "--scaling", "--model", "vil_micro", "--batch", "1",
                        "--rounds", "3")  # fmt: skip
    sc = result["scaling"]
    assert sc["images"] == [224, 448] and sc["rounds"] == 3
    lo, hi = sc["ms_per_img"]["224"], sc["ms_per_img"]["448"]
    assert len(lo) == len(hi) == 3 and min(lo + hi) > 0
    ratios = sorted(b / a for a, b in zip(lo, hi, strict=True))
    assert math.isclose(sc["ratio_median"], ratios[1]) and sc["ratio_min"] == ratios[0] and sc["ratio_max"] == ratios[2]
    assert result["rows"] == [] and result["summary"]["paired_cost_ratio_448_vs_224"] == sc["ratio_median"]
    assert "cost ratio 448/224 per round" in result["stdout"]
    assert_both_allocators(result, "scaling")


def test_encoder_speed_pairs_rounds_of_the_two_modes(tmp_path):
    out = tmp_path / "encoder_speed.json"
    result = run_script("encoder_speed.py", out, "--only-paired", "--modes", "--model", "mal_micro", "--batch", "1",
                        "--rounds", "3")  # fmt: skip
    md = result["modes"]
    assert md["image"] == 192 and md["rounds"] == 3
    for prefix in ("", "train_"):
        ft, pt = md[prefix + "ms_per_img"]["finetune"], md[prefix + "ms_per_img"]["pretrain"]
        assert len(ft) == len(pt) == 3 and min(ft + pt) > 0
        ratios = sorted(b / a for a, b in zip(ft, pt, strict=True))
        assert math.isclose(md[prefix + "ratio_median"], ratios[1])
        assert md[prefix + "ratio_min"] == ratios[0] and md[prefix + "ratio_max"] == ratios[2]
    assert result["rows"] == [] and result["summary"]["paired_pretrain_vs_finetune"] == md["ratio_median"]
    assert result["summary"]["paired_pretrain_vs_finetune_train"] == md["train_ratio_median"]
    assert "pretrain / finetune mode cost per round" in result["stdout"]
    assert_both_allocators(result, "modes")


def assert_both_allocators(result: dict, key: str) -> None:
    """The paired comparison ran as a library user's script (building the models kept freed memory, on glibc) and
    with ``MAL_RETAIN_FREED_MEMORY=0``, each in its own process."""
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert result[key]["retain_freed_memory"] is glibc
    assert result[key + "_opted_out"]["retain_freed_memory"] is False
    assert result[key + "_opted_out"]["rounds"] == result[key]["rounds"]
    assert "glibc's default allocator" in result["stdout"]


def test_cli_startup_quick(tmp_path):
    cmd = [sys.executable, str(BENCHMARKS / "cli_startup.py"), "--quick", "--out", str(tmp_path / "s.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {r["case"]: r for r in json.loads((tmp_path / "s.json").read_text())["rows"]}
    assert {"mal --help", "import mal", "import torch (for scale)"} <= set(rows)
    assert all(r["min_s"] > 0 for r in rows.values())


def test_data_loading_quick(tmp_path):
    out = tmp_path / "data_loading.json"
    result = run_script("data_loading.py", out)
    assert result["benchmark"] == "data_loading" and result["settings"]["quick"]
    assert result["folder"]["images"] == 48 and result["folder"]["mean_kb"] > 0
    rows = result["rows"]
    assert [(r["recipe"], r["workers"]) for r in rows] == [("finetune", 0), ("finetune", 1), ("pretrain", 0),
                                                          ("pretrain", 1)]  # fmt: skip
    for r in rows:
        assert r["img_per_s"] > 0 and r["timed_images"] == 2 * 8
    assert list(result["summary"]) == ["finetune", "pretrain"]
    assert list(result["summary"]["finetune"]["ms_per_image"])[-1] == "decode + crop + resize + RandAugment"
    for s in result["summary"].values():
        assert s["workers_for_target"] == math.ceil(2000 * s["cpu_ms_per_image"] / 1000)
        assert math.isclose(s["img_per_s_per_core"], 1000 / s["cpu_ms_per_image"])
        assert list(s["ms_per_image"])[:2] == ["decode", "decode + crop + resize"] and s["batch_ops_img_per_s_cpu"] > 0
        assert s["loader_img_per_s_one_worker"] > 0
    assert "| recipe | workers | img/s | img/s per worker |" in result["stdout"]


def test_mamba_speed_quick(tmp_path):
    out = tmp_path / "mamba_speed.json"
    result = run_script("mamba_speed.py", out)
    assert result["settings"] == {"size": "micro", "images": [32, 64], "batch": 2, "rounds": 2, "quick": True}
    assert {r["backend"] for r in result["scan"]} == {"loop", "parallel"}
    assert all(r["ms_fwd_bwd"] > 0 for r in result["scan"])
    rows = result["encoders"]["rows"]
    assert set(rows) == {f"{f}/{c}" for f in ("vil", "vit", "vim", "arm") for c in ("32px", "64px", "32px_fwd_bwd")}
    assert all(r["cost_vs_vil_median"] == 1.0 for k, r in rows.items() if k.startswith("vil/"))
    assert all(r["ms_per_img_median"] > 0 for r in rows.values())
    assert "| arm_micro |" in result["stdout"]


def test_grad_checkpointing_quick(tmp_path):
    out = tmp_path / "grad_checkpointing.json"
    result = run_script("grad_checkpointing.py", out)
    off, on = result["rows"]
    assert (off["model"], off["checkpointing"], on["checkpointing"]) == ("mal_micro", False, True)
    assert 0 < on["activation_mb"] < off["activation_mb"] / 2
    assert off["activation_gb_at_batch_64"] == pytest.approx(off["activation_mb_per_image"] * 64 / 1024)
    assert "| mal_micro | on |" in result["stdout"]
