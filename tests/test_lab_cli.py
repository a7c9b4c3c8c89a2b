"""The gluon-optim command line, through its real entry point, on tiny budgets."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gluon_optim.lab import cli

TINY = [
    "--model-opt",
    "n_layer=1",
    "--model-opt",
    "n_embd=32",
    "--model-opt",
    "block_size=16",
    "--steps",
    "4",
    "--batch-size",
    "4",
    "--eval-every",
    "2",
    "--eval-batches",
    "2",
    "--quiet",
]


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    gen = torch.Generator().manual_seed(1)
    path = tmp_path / "c.txt"
    path.write_bytes(bytes(torch.randint(32, 127, (4000,), generator=gen).tolist()))
    return f"text:{path}"


def test_help_through_the_console_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gluon_optim.lab.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("demo", "train", "compare", "sweep", "smoothness", "bench", "plot"):
        assert command in out
    train_help = subprocess.run(
        [sys.executable, "-m", "gluon_optim.lab.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--resume" in train_help and "torch-muon" in train_help


def test_train_and_resume(corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--data",
                corpus,
                "--optimizer",
                "muon",
                "--out",
                str(out),
                "--opt",
                "adamw_lr=0.003",
                *TINY,
            ]
        )
        == 0
    )
    assert "final val loss" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["options"]["adamw_lr"] == 0.003
    assert cli.main(["train", "--resume", str(out), "--quiet"]) == 0
    with pytest.raises(SystemExit, match="already holds a run"):
        cli.main(["train", "--data", corpus, "--out", str(out), *TINY])


def test_compare_sweep_plot(
    corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cmp_dir = tmp_path / "cmp"
    assert (
        cli.main(
            [
                "compare",
                "--data",
                corpus,
                "--optimizers",
                "adamw,unscion@0.001",
                "--seeds",
                "0,1",
                "--out",
                str(cmp_dir),
                "--target-loss",
                "50",
                *TINY,
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "| adamw |" in text and "| unscion-lr0.001 |" in text
    assert "steps to target" in text and "| 2 | 2 |" in text  # reached at the first eval
    assert (cmp_dir / "report.md").exists() and (cmp_dir / "loss.png").stat().st_size > 1000
    rows = json.loads((cmp_dir / "compare.json").read_text())["rows"]
    assert [r["seeds"] for r in rows] == [2, 2]

    sweep_dir = tmp_path / "sweep"
    assert (
        cli.main(
            [
                "sweep",
                "--data",
                corpus,
                "--optimizers",
                "unscion",
                "--lrs",
                "0.0005,0.002",
                "--out",
                str(sweep_dir),
                *TINY,
            ]
        )
        == 0
    )
    assert "best unscion" in capsys.readouterr().out
    assert len(json.loads((sweep_dir / "sweep.json").read_text())["points"]) == 2

    png = tmp_path / "p.png"
    runs = [str(p) for p in sorted(cmp_dir.iterdir()) if p.is_dir()]
    assert cli.main(["plot", *runs, "--out", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_demo_on_a_tiny_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    small = dataclasses.replace(
        cli.DEMO_CONFIG,
        steps=2,
        eval_every=2,
        eval_batches=1,
        batch_size=2,
        model_options={"n_layer": 1, "n_embd": 16, "block_size": 16},
    )
    monkeypatch.setattr(cli, "DEMO_CONFIG", small)
    monkeypatch.setattr(cli, "DEMO_SEEDS", (0,))
    out = tmp_path / "demo"
    assert (
        cli.main(["demo", "--out", str(out), "--quiet", "--data-cache", str(tmp_path / "cache")])
        == 0
    )
    text = capsys.readouterr().out
    for name in cli.DEMO_OPTIMIZERS:
        assert f"| {name} |" in text
    assert f"report: {out / 'report.md'}" in text


def test_bad_input_is_a_clear_error(
    corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli.main(["train", "--data", "text:/no/such/file", "--out", str(tmp_path / "a"), *TINY])
        == 2
    )
    assert "/no/such/file" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "train",
                "--data",
                corpus,
                "--opt",
                "momentum=1.5",
                "--out",
                str(tmp_path / "b"),
                *TINY,
            ]
        )
        == 2
    )
    assert "Invalid momentum: 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        cli.main(["train", "--data", corpus, "--opt", "momentum", *TINY])
    with pytest.raises(SystemExit):
        cli.main(["train", "--optimizer", "sgd"])


def test_bench_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    assert (
        cli.main(
            [
                "bench",
                "--widths",
                "16",
                "--n-layer",
                "1",
                "--repeats",
                "2",
                "--warmup",
                "1",
                "--sizes",
                "8",
                "--scaling-repeats",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "torch.optim.Muon" in capsys.readouterr().out
    assert (out / "bench.json").exists() and (out / "scaling.png").exists()
