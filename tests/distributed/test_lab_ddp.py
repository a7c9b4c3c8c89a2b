"""The lab under --parallel ddp and fsdp2: rank 0 writes one run folder that a one-process run
matches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from gluon_optim.lab import report
from gluon_optim.lab.cli import main
from gluon_optim.lab.parallel import run
from gluon_optim.lab.train import ConfigError, RunConfig, train
from test_lab_train import _config as lab_config

_ENV = "GLUON_OPTIM_TEST_LAB_DIR"


def _config(folder: Path, **kw: Any) -> RunConfig:
    corpus = f"text:{folder / 'corpus.txt'}"
    return lab_config(corpus, optimizer="muon", steps=6, eval_every=3, lr=None, threads=1, **kw)


def _ddp_runs(rank: int, world: int) -> None:
    folder = Path(os.environ[_ENV])
    for split in ("none", "rank"):
        config = _config(folder, parallel="ddp", batch_split=split)
        train(config, folder / f"ddp-{split}", progress=False)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    gen = torch.Generator().manual_seed(0)
    (tmp_path / "corpus.txt").write_bytes(
        bytes(torch.randint(32, 127, (6000,), generator=gen).tolist())
    )
    monkeypatch.setenv(_ENV, str(tmp_path))
    return tmp_path


def _check_against_one_process(folder: Path, prefix: str) -> None:
    """Runs ``{prefix}-none`` and ``{prefix}-rank`` against one process at batch 4 and 8."""
    threads = torch.get_num_threads()
    try:
        train(_config(folder), folder / "one-b4", progress=False)
        train(_config(folder, batch_size=8), folder / "one-b8", progress=False)
    finally:
        torch.set_num_threads(threads)
    # The same batch on both ranks: bit for bit.
    same = report.compare_runs(folder / f"{prefix}-none", folder / "one-b4")
    assert same["first_diff_step"] is None and same["max_param_diff"] == 0.0
    # Each rank its half of a batch of 8: what one process sees at 8, up to the order of sums.
    split = report.compare_runs(folder / f"{prefix}-rank", folder / "one-b8")
    assert split["steps"] == 6 and split["max_loss_diff"] < 1e-3
    # Rank 0 alone wrote the folder: one metrics line per step.
    assert len((folder / f"{prefix}-rank" / "metrics.jsonl").read_text().splitlines()) == 6


def test_ddp_runs_match_one_process(folder: Path) -> None:
    run(_ddp_runs, 2, folder / "spawn")
    _check_against_one_process(folder, "ddp")


def _fsdp_runs(rank: int, world: int) -> None:
    folder = Path(os.environ[_ENV])
    for split in ("none", "rank"):
        config = _config(folder, parallel="fsdp2", batch_split=split)
        train(config, folder / f"fsdp-{split}", progress=False)
    # Stopped after 3 of 6 steps (a checkpoint is written), for the resume below.
    config = _config(folder, parallel="fsdp2", batch_split="none", checkpoint_every=3)
    train(config, folder / "fsdp-stopped", progress=False, stop_after=3)


def _resume_in_one(rank: int, world: int) -> None:
    train(RunConfig(), Path(os.environ[_ENV]) / "fsdp-stopped", resume=True, progress=False)


def test_fsdp2_runs_match_one_process_and_resume_at_another_world_size(folder: Path) -> None:
    run(_fsdp_runs, 2, folder / "spawn")
    run(_resume_in_one, 1, folder / "spawn1")
    # Every parameter a Shard(0) DTensor.
    _check_against_one_process(folder, "fsdp")
    # Saved at 2 ranks after step 3 (whole tensors), continued by 1: as if never stopped.
    resumed = report.compare_runs(folder / "fsdp-stopped", folder / "one-b4")
    assert resumed["steps"] == 6
    assert resumed["first_diff_step"] is None and resumed["max_param_diff"] == 0.0


def test_the_displacement_probe_is_refused_under_fsdp2(folder: Path) -> None:
    config = _config(folder, parallel="fsdp2", probe_every=2, probe_displacement="1")
    with pytest.raises(ConfigError, match="displacement probe does not run under --parallel"):
        config.validate()


def test_parallel_needs_torchrun_and_one_folder(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="--parallel ddp runs under torchrun"):
        train(_config(folder, parallel="ddp"), folder / "x", progress=False)
    capsys.readouterr()
    assert main(["train", "--parallel", "ddp", "--steps", "1"]) == 2
    assert "train: error: --parallel: ddp needs --out" in capsys.readouterr().err
