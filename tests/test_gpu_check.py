"""benchmarks/gpu_check.py on the CPU: its skip path, and its benchmark on tiny shapes.

No GPU has been lent to this project, so these are the parts of ``make gpu-check`` that CI can
run: without CUDA it must print one line and exit 0, and its benchmark, given the device as a
parameter, must run (and agree with torch.optim.Muon where the library promises it) on the CPU.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    # benchmarks/ is not a package: load the script as the module it is when run.
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_prints_one_line_and_exits_0() -> None:
    # An empty CUDA_VISIBLE_DEVICES hides every GPU, so this is the skip path on any machine.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and "skipped" in lines[0] and "CUDA" in lines[0], lines


def test_bench_runs_on_the_cpu_for_a_tiny_shape(gpu_check: ModuleType) -> None:
    result = gpu_check.bench_direction_step(
        "cpu", widths=(8,), n_layer=1, repeats=2, warmup=1, compile_backend="eager"
    )
    block = result["widths"]["8"]
    assert block["n_matrices"] == 4 and block["n_params"] == 8 * 8 * 12
    rows = {r["name"]: r for r in block["rows"]}
    assert list(rows) == [
        "torch.optim.Muon",
        "go.muon",
        "go.muon fast",
        "go.muon compile=eager",
        "go.muon fast compile=eager",
    ]
    assert rows["torch.optim.Muon"]["ratio"] == 1.0
    # torch's kernel: torch.optim.Muon's iterates bit for bit (on the CPU; the GPU run reports).
    assert rows["go.muon"]["bit_identical"]
    for r in rows.values():
        assert r["median_ms"] > 0 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert math.isfinite(r["max_abs_diff"])
    assert 0 < rows["go.muon fast"]["max_abs_diff"] < 0.1  # other coefficients, same direction
    table = gpu_check.format_bench(result)
    assert all(f"| {name} |" in table for name in rows)
    assert result["meta"]["device"] == "cpu"


def test_the_lab_says_it_cannot_train_on_cuda(gpu_check: ModuleType, tmp_path: Path) -> None:
    lab = gpu_check.lab_on_cuda(tmp_path)
    assert lab["status"] == "not supported" and "device" in lab["why"]
