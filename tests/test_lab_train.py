"""The training loop: schedules, resume bit for bit, atomic checkpoints, image and text tasks."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from gluon_optim.lab import train as train_mod
from gluon_optim.lab.train import RunConfig, atomic_save, lr_multiplier, read_metrics, train

TINY_GPT = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16}


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    gen = torch.Generator().manual_seed(0)
    text = bytes(torch.randint(32, 127, (6000,), generator=gen).tolist())
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    return f"text:{path}"


def _config(corpus: str, **kw: object) -> RunConfig:
    base = RunConfig(
        model="gpt-tiny",
        data=corpus,
        optimizer="unscion",
        steps=8,
        batch_size=4,
        eval_every=4,
        eval_batches=2,
        model_options=dict(TINY_GPT),
        lr=0.001,
    )
    return dataclasses.replace(base, **kw)


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def test_lr_schedules() -> None:
    c = RunConfig(steps=100, schedule="wsd", decay_frac=0.2, warmup=10)
    assert lr_multiplier(c, 0) == pytest.approx(0.1)
    assert lr_multiplier(c, 50) == 1.0
    assert lr_multiplier(c, 90) == pytest.approx(0.5)
    c = RunConfig(steps=100, schedule="cosine")
    assert lr_multiplier(c, 0) == 1.0 and lr_multiplier(c, 50) == pytest.approx(0.5)
    assert lr_multiplier(RunConfig(steps=10), 7) == 1.0


@pytest.mark.parametrize(
    "optimizer", ["unscion", "muon", "adamw", "torch-muon", "gluon-mvr2", "limuon-ns"]
)
def test_resume_is_bit_identical(corpus: str, tmp_path: Path, optimizer: str) -> None:
    config = _config(corpus, optimizer=optimizer, lr=None, schedule="wsd", checkpoint_every=3)
    full = train(config, tmp_path / "full", progress=False)
    part = train(config, tmp_path / "part", progress=False, stop_after=5)
    assert part.steps == 5 and not (tmp_path / "part" / "summary.json").exists()
    resumed = train(RunConfig(), tmp_path / "part", resume=True, progress=False)
    assert resumed.final_val_loss == full.final_val_loss
    a, b = _params(tmp_path / "full"), _params(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in read_metrics(tmp_path / "full")]
    assert losses == [r["loss"] for r in read_metrics(tmp_path / "part")]


def test_killed_run_resumes_from_its_last_checkpoint(
    corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(corpus, checkpoint_every=3)
    full = train(config, tmp_path / "full", progress=False)

    calls = {"n": 0}
    real = train_mod.batch_loss

    def dying(*args: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 6:  # the 6th step dies after checkpoint 3 was written
            raise KeyboardInterrupt
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(train_mod, "batch_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed", progress=False)
    monkeypatch.setattr(train_mod, "batch_loss", real)
    assert torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"] == 3
    resumed = train(RunConfig(), tmp_path / "killed", resume=True, progress=False)
    assert resumed.final_val_loss == full.final_val_loss
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == list(range(1, 9))


def test_interrupted_checkpoint_write_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoint.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def torn(obj: object, f: object) -> None:
        f.write(b"partial bytes")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_run_folder_contents(corpus: str, tmp_path: Path) -> None:
    result = train(_config(corpus, grad_accum=2), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in (
        "config.json",
        "meta.json",
        "groups.txt",
        "metrics.jsonl",
        "checkpoint.pt",
        "summary.json",
    ):
        assert (run / name).exists(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["lr"] == 0.001 and cfg["config"]["grad_accum"] == 2
    assert "git_sha" in json.loads((run / "meta.json").read_text())
    assert "hidden" in (run / "groups.txt").read_text()
    recs = read_metrics(run)
    assert recs[-1]["tokens"] == 8 * 4 * 2 * 16
    assert {"step", "tokens", "loss", "lr", "step_time", "opt_state_bytes"} <= set(recs[0])
    assert [r["step"] for r in recs if "val_loss" in r] == [4, 8]
    assert result.optimizer_state_bytes == recs[-1]["opt_state_bytes"] > 0


@pytest.mark.parametrize(("optimizer", "per_step"), [("gluon-mvr1", 2), ("gluon-mvr1-approx", 1)])
def test_gradient_evaluations_are_counted(
    corpus: str, tmp_path: Path, optimizer: str, per_step: int
) -> None:
    # Exact two-point mode evaluates the batch at X^(k-1) and X^k (once on the first step).
    train(_config(corpus, optimizer=optimizer, grad_accum=2), tmp_path / "r", progress=False)
    recs = read_metrics(tmp_path / "r")
    assert [r["grad_evals"] for r in recs] == [2 + 2 * per_step * k for k in range(8)]
    # The previous iterate (exact) or gradient (approx) is two-point state, not momentum.
    assert recs[-1]["opt_state_two_point"] == recs[-1]["opt_state_momentum"] > 0


def test_image_task_full_batch(tmp_path: Path) -> None:
    config = RunConfig(
        model="cnn-small",
        data="digits",
        optimizer="unscion",
        steps=3,
        batch_size=0,
        eval_every=3,
        model_options={"widths": [8, 16]},
    )
    result = train(config, tmp_path / "cnn", progress=False)
    assert result.final_val_accuracy is not None and 0.0 <= result.final_val_accuracy <= 1.0
    assert read_metrics(tmp_path / "cnn")[0]["tokens"] == 1347


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "Invalid steps"),
        ({"optimizer": "sgd"}, "Unknown optimizer 'sgd'"),
        ({"schedule": "step"}, "Unknown schedule 'step'"),
        ({"lr": -1.0}, "Invalid lr"),
        ({"model": "gpt-huge"}, "gpt-huge"),
    ],
)
def test_invalid_config(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(RunConfig(), **change).validate()


def test_mismatched_model_and_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is an image model"):
        train(
            RunConfig(model="cnn-small", data="text:" + __file__, steps=1),
            tmp_path / "x",
            progress=False,
        )


# -- checkpoints that know their run ---------------------------------------------------------------
def test_resume_refuses_another_runs_checkpoint(tmp_path: Path, corpus: str) -> None:
    train(_config(corpus, optimizer="unscion"), tmp_path / "a", progress=False)
    train(_config(corpus, optimizer="muon"), tmp_path / "b", progress=False, stop_after=4)
    shutil.copy(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"belongs to another run \(optimizer: 'unscion' there"):
        train(RunConfig(), tmp_path / "b", resume=True, progress=False)


def test_resume_refuses_a_config_edited_after_the_checkpoint(tmp_path: Path, corpus: str) -> None:
    run = tmp_path / "r"
    train(_config(corpus, optimizer="muon"), run, progress=False, stop_after=4)
    saved = json.loads((run / "config.json").read_text())
    saved["config"]["optimizer"] = "limuon"
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="optimizer: 'muon' there, 'limuon' here"):
        train(RunConfig(), run, resume=True, progress=False)


def test_resume_refuses_a_corrupted_checkpoint(tmp_path: Path, corpus: str) -> None:
    run = tmp_path / "r"
    train(_config(corpus), run, progress=False, stop_after=4)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    first = next(iter(ckpt["model"]))
    ckpt["model"][first].view(-1)[0] += 1.0  # one changed weight, as a flipped bit would
    torch.save(ckpt, run / "checkpoint.pt")
    with pytest.raises(ValueError, match="corrupt"):
        train(RunConfig(), run, resume=True, progress=False)
    (run / "checkpoint.pt").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train(RunConfig(), run, resume=True, progress=False)


@pytest.mark.parametrize(
    ("key", "value"), [("step", 2), ("elapsed", 0.0), ("grad_evals", 1), ("config", None)]
)
def test_resume_refuses_an_edited_step_time_or_config_in_the_checkpoint(
    tmp_path: Path, corpus: str, key: str, value: Any
) -> None:
    # The weights are intact, so only the second checksum can see that the run would resume at
    # another point of its schedule (or count its time and gradients from the wrong start).
    run = tmp_path / "r"
    train(_config(corpus), run, progress=False, stop_after=4)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    if key == "config":
        ckpt["config"] = {**ckpt["config"], "seed": ckpt["config"]["seed"] + 1}
        (run / "config.json").write_text(
            json.dumps({**json.loads((run / "config.json").read_text()), "config": ckpt["config"]})
        )
    else:
        ckpt[key] = value
    torch.save(ckpt, run / "checkpoint.pt")
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="do not match their checksum"):
        train(RunConfig(), run, resume=True, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_resume_with_more_steps_continues_as_a_longer_run(tmp_path: Path, corpus: str) -> None:
    train(_config(corpus, steps=8), tmp_path / "short", progress=False)
    train(RunConfig(), tmp_path / "short", resume=True, progress=False, steps=12)
    train(_config(corpus, steps=12), tmp_path / "long", progress=False)
    a, b = _params(tmp_path / "short"), _params(tmp_path / "long")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "short" / "config.json").read_text())["config"]["steps"] == 12
    with pytest.raises(ValueError, match="would change this run's wsd schedule"):
        train(_config(corpus, schedule="wsd"), tmp_path / "w", progress=False)
        train(RunConfig(), tmp_path / "w", resume=True, progress=False, steps=20)


def test_resume_survives_a_torn_metrics_line_and_stale_temp_files(
    tmp_path: Path, corpus: str
) -> None:
    run = tmp_path / "r"
    train(_config(corpus), run, progress=False, stop_after=4)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 2.')  # killed in the middle of a line
    (run / ".checkpoint.pt.abc.tmp").write_bytes(b"torn")
    train(RunConfig(), run, resume=True, progress=False)
    assert not list(run.glob(".*.tmp"))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = "{broken"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a JSON record"):
        read_metrics(run)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_state_dtype_halves_the_optimizer_state_of_a_lab_run(
    tmp_path: Path, corpus: str, optimizer: str
) -> None:
    full = train(_config(corpus, optimizer=optimizer), tmp_path / "f", progress=False)
    half = train(
        _config(corpus, optimizer=optimizer, opt_options={"state_dtype": "bfloat16"}),
        tmp_path / "h",
        progress=False,
    )
    # Moments halve; the step counters (4 bytes a parameter tensor) do not.
    counters = 4 * sum(1 for _ in _params(tmp_path / "f"))
    assert half.optimizer_state_bytes - counters == (full.optimizer_state_bytes - counters) // 2
    assert "state bfloat16" in (tmp_path / "h" / "groups.txt").read_text()
