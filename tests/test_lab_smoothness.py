"""`gluon-optim smoothness` and training with fitted radii, on tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gluon_optim import smoothness
from gluon_optim.lab import cli
from gluon_optim.lab import optimizers as optim_registry
from gluon_optim.lab.models import build_model
from gluon_optim.lab.train import RunConfig, train

CNN = [
    "--protocols",
    "cnn",
    "--steps",
    "12",
    "--every",
    "3",
    "--model-opt",
    "widths=[8, 16]",
    "--quiet",
]


def test_smoothness_protocol_then_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sm"
    assert (
        cli.main(
            [
                "smoothness",
                *CNN,
                "--sweep",
                "0.5,1",
                "--then-train",
                "--seeds",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "| conv |" in text and "theory 1/L1" in text
    report = (out / "cnn" / "report.md").read_text()
    assert "Fitted constants per parameter" in report and "nan" not in report.lower()
    records = smoothness.read_records(out / "cnn" / "run" / "smoothness.jsonl")
    assert {r["step"] for r in records} == {3, 6, 9, 12}
    fits = smoothness.load_fits(out / "cnn" / "fits-role.json")
    assert {"conv", "head", "norm"} <= set(fits)
    assert all(f.l1 is not None and f.l1 > 0 for f in fits.values())
    for role in ("conv", "head"):
        assert (out / "cnn" / f"smoothness-{role}.png").stat().st_size > 1000
    swept = json.loads((out / "cnn" / "smoothness.json").read_text())["swept_lr"]
    assert swept is not None
    rows = json.loads((out / "cnn" / "train" / "compare.json").read_text())["rows"]
    assert [r["optimizer"] for r in rows] == ["unscion", "gluon-lr1-fit"]


def test_train_with_fitted_radii(tmp_path: Path) -> None:
    fits = {
        role: smoothness.Fit(l0=1e-6, l1=l1, mse_rel=0.1, n_points=10, role=role)
        for role, l1 in (("conv", 20.0), ("head", 500.0), ("norm", 50.0), ("bias", 50.0))
    }
    path = tmp_path / "fits.json"
    smoothness.save_fits(path, fits)
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--model",
                "cnn-small",
                "--data",
                "digits",
                "--optimizer",
                "gluon",
                "--fit",
                str(path),
                "--model-opt",
                "widths=[8, 16]",
                "--steps",
                "3",
                "--batch-size",
                "32",
                "--eval-every",
                "3",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == 1.0 and cfg["options"]["fit"] == str(path)
    groups = (out / "groups.txt").read_text()
    assert "conv" in groups


def test_probe_in_the_training_loop_survives_resume(tmp_path: Path) -> None:
    config = RunConfig(
        model="cnn-small",
        data="digits",
        optimizer="unscion",
        steps=8,
        batch_size=32,
        probe_every=2,
        checkpoint_every=3,
        eval_every=4,
        model_options={"widths": [8, 16]},
    )
    train(config, tmp_path / "full", progress=False)
    train(config, tmp_path / "part", progress=False, stop_after=5)
    train(RunConfig(), tmp_path / "part", resume=True, progress=False)
    full = smoothness.read_records(tmp_path / "full" / "smoothness.jsonl")
    part = smoothness.read_records(tmp_path / "part" / "smoothness.jsonl")
    # Steps are numbered as in metrics.jsonl. The pair (5, 6) straddles the stop: its first
    # half was taken before it, so it is dropped, never half-measured; every other record is
    # the uninterrupted run's, value for value.
    assert sorted({r["step"] for r in full}) == [2, 4, 6, 8]
    assert sorted({r["step"] for r in part}) == [2, 4, 8]
    key = lambda r: (r["step"], r["param"])  # noqa: E731
    assert sorted(part, key=key) == sorted((r for r in full if r["step"] != 6), key=key)


def test_fits_that_miss_a_role_are_refused(tmp_path: Path) -> None:
    # Fits from a model without a head (a tied one) on a model with a head: that head would
    # have trained at radius lr * scale = 1.
    fits = {
        role: smoothness.Fit(l0=1e-6, l1=20.0, mse_rel=0.1, n_points=10, role=role)
        for role in ("conv", "norm", "bias")
    }
    path = tmp_path / "fits.json"
    smoothness.save_fits(path, fits)
    model = build_model("cnn-small", in_channels=1, num_classes=10, widths=(8, 16))
    with pytest.raises(ValueError, match=r"no fitted constants for role\(s\) \['head'\]"):
        optim_registry.build("gluon", model, 1.0, {"fit": str(path)})


def test_the_radius_check_reports_both_estimates_per_role_and_radius(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "rc"
    gpt = ["--protocols", "gpt", "--steps", "8", "--every", "2", "--threads", "1", "--quiet"]
    assert cli.main(["smoothness", *gpt, "--radius-check", "0.5,2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| hidden | 0.5 |" in text and "| hidden | 2 |" in text and "trajectory slope" in text
    payload = json.loads((out / "gpt" / "radius-check" / "radius-check.json").read_text())
    assert payload["factors"] == [0.5, 2.0]
    hidden = [r for r in payload["rows"] if r["role"] == "hidden"]
    assert hidden[1]["radius"] == pytest.approx(4 * hidden[0]["radius"])
    for row in hidden:
        assert row["displacement"]["l1"] is not None and row["trajectory"]["l1"] is not None
        assert list(row["displacement_by_scale"]) == ["0.1", "0.3", "1.0", "3.0"]
    assert payload["summary"]["hidden"]["trajectory"]["slope"] is not None


def test_the_displacement_probe_leaves_a_training_run_bit_identical(tmp_path: Path) -> None:
    base = RunConfig(
        model="gpt-tiny", optimizer="unscion", steps=6, batch_size=4, eval_every=6,
        probe_every=3, threads=1,
    )  # fmt: skip
    train(base, tmp_path / "plain", progress=False)
    probed = RunConfig(**{**base.__dict__, "probe_displacement": "0.5,2"})
    train(probed, tmp_path / "probed", progress=False)
    a = [
        json.loads(x)["loss"]
        for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
    ]
    b = [
        json.loads(x)["loss"]
        for x in (tmp_path / "probed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert a == b
    records = smoothness.read_records(tmp_path / "probed" / "displacement.jsonl")
    assert {r["step"] for r in records} == {3, 6} and {r["scale"] for r in records} == {0.5, 2.0}
    with pytest.raises(ValueError, match="probe_displacement needs probe_every"):
        RunConfig(probe_displacement="1").validate()
    with pytest.raises(ValueError, match="Invalid probe_displacement"):
        RunConfig(probe_every=2, probe_displacement="0,x").validate()
