"""Tests of gluon_optim.lab.bench on tiny widths (no timing assertions: CPU load varies)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from gluon_optim.lab import bench

NAMES = (
    "torch.optim.Muon",
    "go.muon jordan5",
    "go.muon polar_express4",
    "go.muon polar_express5",
    "go.Gluon spectral/rms",
    "pto.Muon",
    "pto.SCION",
    "torch.optim.AdamW",
)


@pytest.fixture(scope="module")
def step_result() -> dict[str, Any]:
    return bench.bench_step((16, 32), repeats=2, warmup=1, n_layer=2, seed=0)


def _rows(result: dict[str, Any], width: int) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in result["widths"][str(width)]["rows"]}


def test_gpt_shapes() -> None:
    shapes = bench.gpt_shapes(8, n_layer=3)
    assert len(shapes) == 12
    assert shapes[:4] == [(24, 8), (8, 8), (32, 8), (8, 32)]
    assert sum(a * b for a, b in shapes) == 3 * 12 * 8 * 8
    with pytest.raises(ValueError):
        bench.gpt_shapes(0)


def test_bench_step_rows(step_result: dict[str, Any]) -> None:
    for width in (16, 32):
        rows = _rows(step_result, width)
        assert set(rows) == set(NAMES)
        for row in rows.values():
            for key in ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "ratio"):
                assert math.isfinite(row[key]) and row[key] > 0, (row["name"], key)
            assert row["min_ms"] <= row["median_ms"] <= row["max_ms"]
            assert row["state_bytes_per_param"] > 0
        assert rows["torch.optim.Muon"]["ratio"] == 1.0
        assert rows["torch.optim.AdamW"]["polar_error"] is None
        assert rows["torch.optim.AdamW"]["state_bytes_per_param"] == pytest.approx(
            8.0, rel=0.01
        )  # + step counters
        assert rows["go.muon jordan5"]["state_bytes_per_param"] == pytest.approx(4.0, rel=0.01)


def test_bench_step_accuracy(step_result: dict[str, Any]) -> None:
    for width in (16, 32):
        rows = _rows(step_result, width)
        torch_err = rows["torch.optim.Muon"]["polar_error"]
        jordan = rows["go.muon jordan5"]["polar_error"]
        assert 0 < torch_err < 1
        assert jordan == pytest.approx(torch_err, abs=1e-6)
        assert rows["go.muon polar_express5"]["polar_error"] < jordan
        for name in ("go.Gluon spectral/rms", "pto.Muon", "pto.SCION"):
            assert 0 < rows[name]["polar_error"] < 1


def test_format_step_table(step_result: dict[str, Any]) -> None:
    text = bench.format_step_table(step_result)
    for name in NAMES:
        assert name in text
    assert "heavyball" in text
    assert "width 16" in text and "width 32" in text


def test_scaling_and_plot(tmp_path: Path) -> None:
    result = bench.bench_scaling((8, 16), repeats=2, warmup=0)
    assert result["sizes"] == [8, 16]
    for values in result["series"].values():
        assert len(values) == 2 and all(v > 0 for v in values)
    assert "polar_svd fp32" in bench.format_scaling_table(result)
    path = bench.plot_scaling(result, tmp_path / "sub" / "scaling.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_main_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    argv = ["--widths", "16", "--repeats", "2", "--warmup", "1", "--n-layer", "1"]
    argv += ["--sizes", "8,16", "--scaling-repeats", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    data = json.loads((out / "bench.json").read_text())
    assert set(data) == {"step", "scaling"}
    assert "16" in data["step"]["widths"]
    assert "torch.optim.Muon" in (out / "bench.md").read_text()
    assert (out / "scaling.png").exists()
    assert "torch.optim.Muon" in capsys.readouterr().out


def test_main_without_scaling(tmp_path: Path) -> None:
    out = tmp_path / "b"
    argv = ["--widths", "16", "--repeats", "1", "--warmup", "0", "--n-layer", "1"]
    assert bench.main([*argv, "--sizes", "", "--out", str(out)]) == 0
    assert json.loads((out / "bench.json").read_text())["scaling"] is None
    assert not (out / "scaling.png").exists()
