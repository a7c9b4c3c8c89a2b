"""Tests of gluon_optim.lab.bench on tiny widths (no timing assertions: CPU load varies)."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gluon_optim.lab import bench
from gluon_optim.lab.bench import command as bench_command
from gluon_optim.lab.bench import step as bench_step_module
from gluon_optim.lab.bench.train import RUN_SETTINGS
from gluon_optim.lab.optimizers import OPTIMIZERS
from gluon_optim.lab.train import RunConfig

HAVE_HEAVYBALL = importlib.util.find_spec("heavyball") is not None
HEAVYBALL_NAMES = ("heavyball.Muon", "heavyball.Scion")
NAMES = (
    "torch.optim.Muon",
    "go.muon jordan5",
    "go.muon jordan5 gram",
    "go.muon pe4 gram",
    "go.muon pe5",
    "go.muon pe5 gram",
    "go.muon pe5 gram foreach",
    "go.muon pe6 gram",
    "go.Gluon spectral/rms",
    "go.Gluon spectral/rms pe5 gram",
    "pto.Muon",
    "pto.SCION",
    *(HEAVYBALL_NAMES if HAVE_HEAVYBALL else ()),
    "torch.optim.AdamW",
)
LMO_NAMES = [n for n in NAMES if n != "torch.optim.AdamW"]
TINY_GPT = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8}


@pytest.fixture(scope="module")
def step_result() -> dict[str, Any]:
    return bench.bench_step((16, 32), repeats=2, warmup=1, n_layer=1, seed=0)


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
        for name in ("go.muon pe5", "go.muon pe5 gram", "go.muon pe5 gram foreach"):
            assert rows[name]["polar_error"] < jordan, name
        assert rows["go.muon pe6 gram"]["polar_error"] < rows["go.muon pe5"]["polar_error"]
        for name in ("go.Gluon spectral/rms", "pto.Muon", "pto.SCION"):
            assert 0 < rows[name]["polar_error"] < 1


def test_bench_step_decaying_spectrum_error(step_result: dict[str, Any]) -> None:
    for width in (16, 32):
        rows = _rows(step_result, width)
        for name in LMO_NAMES:
            err = rows[name]["polar_error_decay"]
            assert err is not None and math.isfinite(err) and 0 < err < 1, (name, err)
        assert rows["torch.optim.AdamW"]["polar_error_decay"] is None
        assert rows["go.muon jordan5"]["polar_error_decay"] == pytest.approx(
            rows["torch.optim.Muon"]["polar_error_decay"], abs=1e-6
        )


def test_decaying_spectrum() -> None:
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(12, 5, generator=gen), torch.randn(4, 9, generator=gen)]
    decay = bench_step_module._decaying_spectrum(grads, seed=0)
    for g, d in zip(grads, decay, strict=True):
        assert d.shape == g.shape
        assert float(d.norm()) == pytest.approx(float(g.norm()), rel=1e-5)
        s = torch.linalg.svdvals(d.double())
        i = torch.arange(1, s.numel() + 1, dtype=torch.float64)
        torch.testing.assert_close(s * i, torch.full_like(s, float(s[0])), rtol=1e-4, atol=0)
    again = bench_step_module._decaying_spectrum(grads, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(decay, again, strict=True))


def test_format_step_table(step_result: dict[str, Any]) -> None:
    text = bench.format_step_table(step_result)
    for name in NAMES:
        assert name in text
    assert "heavyball" in text
    assert "| polar err | polar err (decay) |" in text
    assert "width 16" in text and "width 32" in text


@pytest.mark.skipif(not HAVE_HEAVYBALL, reason="heavyball is not installed")
def test_heavyball_entries(step_result: dict[str, Any]) -> None:
    assert "heavyball" not in step_result["not_measured"]
    for width in (16, 32):
        rows = _rows(step_result, width)
        for name in HEAVYBALL_NAMES:
            assert "eager" in rows[name]["note"]
            assert rows[name]["state_bytes_per_param"] >= 4.0  # nested state is counted
            assert 0 < rows[name]["polar_error"] < 1


@pytest.mark.skipif(not HAVE_HEAVYBALL, reason="heavyball is not installed")
def test_heavyball_step_is_eager_and_restores_the_setting() -> None:
    import heavyball.utils

    entry = {e.name: e for e in bench.contenders().entries}["heavyball.Muon"]
    before = heavyball.utils.compile_mode
    assert before is not None  # HeavyBall compiles by default
    params = [torch.nn.Parameter(torch.zeros(6, 4))]
    opt = entry.factory(params, 0.1)
    params[0].grad = torch.randn(6, 4)
    opt.step()
    assert heavyball.utils.compile_mode == before
    assert float(params[0].detach().abs().sum()) > 0


def test_heavyball_missing_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "heavyball", None)  # makes `import heavyball` fail
    table = bench.contenders()  # built per call: no module-level state to reset
    names = [e.name for e in table.entries]
    assert not any(n.startswith("heavyball") for n in names)
    assert "not installed" in table.not_measured["heavyball"]


def test_scaling_and_plot(tmp_path: Path) -> None:
    result = bench.bench_scaling((8, 16), repeats=2, warmup=0, rsvd_n=64)
    assert result["sizes"] == [8, 16]
    for values in result["series"].values():
        assert len(values) == 2 and all(v > 0 for v in values)
    assert "polar_svd fp32" in bench.format_scaling_table(result)
    assert "NS polar_express5 bf16 gram, n x 4n" in result["series"]
    block = result["rsvd"]
    assert block["ranks"] == [4, 8, 16, 32, 64, 128, 256] and len(block["ms"]) == 7
    assert block["svd_ms"] > 0 and block["ns_ms"] > 0
    assert "randomized SVD" in bench.format_scaling_table(result)
    path = bench.plot_scaling(result, tmp_path / "sub" / "scaling.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    none = bench.bench_scaling((8,), repeats=1, warmup=0, ranks=())
    assert none["rsvd"] is None
    with pytest.raises(ValueError, match="ranks"):
        bench.bench_scaling((8,), ranks=(0,))


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "corpus.txt"
    path.write_bytes(bytes(torch.randint(32, 127, (4000,), generator=gen).tolist()))
    return f"text:{path}"


def test_bench_train(corpus: str) -> None:
    names = [*bench.TRAIN_OPTIMIZERS, "gluon-mvr1"]  # gluon-mvr1: an exact two-point step
    result = bench.bench_train(
        names, steps=2, warmup=1, batch_size=2, data=corpus, model_options=TINY_GPT
    )
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == names
    assert result["meta"]["seq_len"] == TINY_GPT["block_size"]
    for name, row in rows.items():
        assert row["median_ms"] > 0 and row["tokens_per_s"] > 0, name
        assert row["tokens_per_s"] == pytest.approx(2 * 8 / (row["median_ms"] / 1e3))
        assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
        assert row["state_bytes_per_param"] > 0
    for name in bench.TRAIN_OPTIMIZERS:
        assert 0 < rows[name]["opt_share"] < 1, name
    assert rows["gluon-mvr1"]["opt_share"] is None
    # every optimizer starts from the same seeded model and batch
    assert len({round(r["loss_first"], 6) for r in rows.values()}) == 1
    text = bench.format_train_table(result)
    for column in ("tokens/s", "opt step ms", "opt share", *names):
        assert column in text


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"optimizers": ["adamw", "no-such-optimizer"]}, "optimizers"),
        ({"optimizers": []}, "optimizers"),
        ({"optimizers": ["adamw", "adamw"]}, "optimizers"),
        ({"steps": 0}, "steps"),
        ({"warmup": -1}, "warmup"),
        ({"batch_size": 0}, "batch_size"),
        ({"seq_len": 9}, "seq_len"),
        ({"model": "cnn-small"}, "model"),
        ({"model": "gpt-huge"}, "model"),
    ],
)
def test_bench_train_rejects_bad_arguments(kwargs: dict[str, Any], argument: str) -> None:
    kwargs = {"model_options": TINY_GPT, **kwargs}
    if kwargs.get("model") == "cnn-small":
        del kwargs["model_options"]
    with pytest.raises(ValueError, match=argument):
        bench.bench_train(**kwargs)


def test_train_optimizer_names_come_from_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    parser = bench.build_parser()
    assert parser.parse_args([]).train_optimizers == list(bench.TRAIN_OPTIMIZERS)
    every = ",".join(OPTIMIZERS)
    assert parser.parse_args(["--train-optimizers", every]).train_optimizers == list(OPTIMIZERS)
    with pytest.raises(SystemExit):
        parser.parse_args(["--train-optimizers", "adamw,nope"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--train-model", "cnn-small"])
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # rejected before any benchmark runs
        bench.main(["--widths", "8", "--train", "--train-steps", "0"])
    assert "steps" in capsys.readouterr().err


def test_main_writes_files(tmp_path: Path, corpus: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    argv = ["--widths", "16", "--repeats", "2", "--warmup", "1", "--n-layer", "1"]
    argv += ["--sizes", "8,16", "--scaling-repeats", "1", "--out", str(out)]
    argv += ["--train", "--train-optimizers", "adamw,muon", "--train-data", corpus]
    argv += ["--train-steps", "1", "--train-warmup", "0"]
    assert bench.main(argv) == 0
    data = json.loads((out / "bench.json").read_text())
    assert set(data) == {"step", "scaling", "train"}
    assert [r["name"] for r in data["train"]["rows"]] == ["adamw", "muon"]
    assert "polar_error_decay" in data["step"]["widths"]["16"]["rows"][0]
    assert "tokens/s" in (out / "bench.md").read_text()
    assert "16" in data["step"]["widths"]
    assert "torch.optim.Muon" in (out / "bench.md").read_text()
    assert (out / "scaling.png").exists()
    assert "torch.optim.Muon" in capsys.readouterr().out


def test_main_without_scaling(tmp_path: Path) -> None:
    out = tmp_path / "b"
    argv = ["--widths", "16", "--repeats", "1", "--warmup", "0", "--n-layer", "1"]
    assert bench.main([*argv, "--sizes", "", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["scaling"] is None and data["train"] is None
    assert not (out / "scaling.png").exists()


def test_bench_step_compile_entry() -> None:
    # The cheap tracing backend stands in for inductor here (no C++ toolchain needed).
    result = bench.bench_step((16,), repeats=1, warmup=1, n_layer=1, compile_backend="eager")
    rows = _rows(result, 16)
    row = rows["go.muon pe5 gram compile=eager"]
    assert row["polar_error"] == pytest.approx(rows["go.muon pe5 gram"]["polar_error"], abs=1e-3)
    with pytest.raises(ValueError, match="compile_backend"):
        bench.bench_step((16,), compile_backend="tensorrt")
    with pytest.raises(SystemExit):
        bench.main(["--compile", "tensorrt"])


def test_run_settings_are_the_run_configs_and_are_forwarded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # bench_train's lab-run settings are RunConfig fields, with RunConfig's defaults ...
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    params = inspect.signature(bench.bench_train).parameters
    for name in RUN_SETTINGS:
        assert name in fields, name
        assert params[name].default == getattr(RunConfig(), name), name
    # ... and the command line forwards every one of them.
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_train(optimizers: list[str], **kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(bench_command, "bench_train", fake_train)
    argv = ["--widths", "8", "--n-layer", "1", "--repeats", "1", "--warmup", "0", "--sizes", ""]
    argv += ["--train", "--train-batch-size", "4", "--train-data", "text:x", "--seed", "5"]
    with pytest.raises(Stop):
        bench.main(argv)
    assert seen == {
        "steps": 20,
        "warmup": 3,
        "model": "gpt-tiny",
        "data": "text:x",
        "batch_size": 4,
        "seed": 5,
        "threads": None,
    }
