"""The gluon-optim command line, through its real entry point, on tiny budgets."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gluon_optim.lab import cli
from gluon_optim.lab.train import RunConfig, option_of

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
    capsys.readouterr()
    assert cli.main(["train", "--data", corpus, "--out", str(out), *TINY]) == 2
    assert f"train: error: --out: {out} already holds a run" in capsys.readouterr().err
    # --resume honours --steps (a constant schedule) and refuses every other change.
    assert cli.main(["train", "--resume", str(out), "--lr", "0.1", "--optimizer", "adamw"]) == 2
    err = capsys.readouterr().err
    assert "error: --resume: continues" in err and "(got --lr, --optimizer)" in err
    steps = json.loads((out / "config.json").read_text())["config"]["steps"]
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--steps", str(steps + 2)]) == 0
    assert f"resuming at step {steps} of {steps + 2}" in capsys.readouterr().err


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
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--data", corpus, "--opt", "momentum", *TINY])
    assert exc.value.code == 2 and "--opt: expected KEY=VALUE" in capsys.readouterr().err
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


#: The options of `train` that are about the command, not the run.
COMMAND_OPTIONS = {"help", "quiet", "out", "resume"}


def _subparser(name: str) -> argparse.ArgumentParser:
    # argparse has no public way to list a parser's options; its _actions is the usual one.
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return typing.cast(argparse.ArgumentParser, sub.choices[name])


def _fields_set_by(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """RunConfig field -> the flags that set it; fails on an option that sets nothing known."""
    out: dict[str, list[str]] = {}
    for action in parser._actions:
        if action.dest in COMMAND_OPTIONS or not action.dest.startswith("config."):
            continue
        out.setdefault(action.dest.removeprefix("config."), []).extend(action.option_strings)
    return out


def test_every_run_config_field_is_a_train_option_and_back() -> None:
    train = _subparser("train")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    flags = _fields_set_by(train)
    assert set(flags) == fields
    # and nothing else: every other option of `train` is about the command
    assert {a.dest for a in train._actions} - {f"config.{n}" for n in fields} == COMMAND_OPTIONS
    assert flags["opt_options"] == ["--opt", "--radius-policy", "--state-dtype", "--fit"]
    assert flags["model_options"] == ["--model-opt"]
    assert flags["batch_size"] == ["--batch-size"]


def test_each_option_sets_its_field() -> None:
    train = _subparser("train")
    samples: dict[object, tuple[str, object]] = {
        int: ("3", 3),
        float: ("0.5", 0.5),
        str: ("x", "x"),
        dict: ("k=[1, 2]", {"k": [1, 2]}),
    }
    for f in dataclasses.fields(RunConfig):
        hint = typing.get_type_hints(RunConfig)[f.name]
        if typing.get_origin(hint) is dict:
            kind: object = dict
        else:  # X or X | None
            kind = next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
        text, value = samples[kind]
        choices = option_of(f).choices
        if choices:
            text = value = list(choices())[-1]
        args = train.parse_args([cli.flag_of(f.name), text])
        assert cli.config_overrides(args, RunConfig()) == {f.name: value}, f.name
    args = train.parse_args(["--opt", "fit=a", "--radius-policy", "l0l1", "--fit", "b.json"])
    assert cli.config_overrides(args, RunConfig()) == {
        "opt_options": {"fit": "b.json", "radius_policy": "l0l1"}
    }
    assert cli.config_overrides(train.parse_args([]), RunConfig()) == {}


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_compare_and_sweep_leave_the_per_run_fields_to_their_own_options(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = _subparser(command)
    varied = {f.name for f in dataclasses.fields(RunConfig) if option_of(f).varied}
    assert varied == {"optimizer", "lr", "seed"}
    assert set(_fields_set_by(parser)) == {f.name for f in dataclasses.fields(RunConfig)} - varied
    with pytest.raises(SystemExit):  # per run: --optimizers name@lr (compare) or --lrs (sweep)
        parser.parse_args(["--lr", "0.01"])
    assert "--lr" in capsys.readouterr().err


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code: object
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors (type, choices)
        code = exc.code
    assert code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "4", "--warmup", "9"], "--warmup"),
        (["--decay-frac", "1.5"], "--decay-frac"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "-1"], "--lr"),
        (["--model", "gpt-huge"], "--model"),
        (["--steps", "many"], "--steps"),
        (["--schedule", "step"], "--schedule"),
    ],
)
def test_a_bad_run_setting_names_its_option(
    argv: list[str], flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _error(["train", *argv, "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert f"error: {flag}:" in err
    assert not (tmp_path / "r").exists()  # rejected before anything ran


def test_compare_and_sweep_check_every_run_before_training(
    corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "c"
    status = cli.main(
        ["compare", "--data", corpus, "--optimizers", "adamw,muonn", "--out", str(out), *TINY]
    )
    assert status == 2 and "unknown optimizer 'muonn'" in capsys.readouterr().err
    assert not list(out.glob("*/metrics.jsonl"))  # adamw did not train first
    out = tmp_path / "s"
    status = cli.main(
        ["sweep", "--data", corpus, "--optimizers", "adamw", "--lrs", "1e-3,-1", "--out", str(out)]
        + TINY
    )
    assert status == 2 and "lr" in capsys.readouterr().err
    assert not list(out.glob("*/metrics.jsonl"))


def test_the_script_without_the_lab_extra_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from gluon_optim.lab.launch import main\n"
        "raise SystemExit(main())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "pip install 'gluon-optim[lab]'" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoints_get_the_mode_of_a_new_file(tmp_path: Path) -> None:
    import os

    from gluon_optim.lab.train import atomic_save

    umask = os.umask(0o022)
    try:
        atomic_save({"x": torch.zeros(1)}, tmp_path / "c.pt")
    finally:
        os.umask(umask)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--widths", "0"], "--widths: must be >= 1, got 0"),
        (["bench", "--widths", ""], "--widths: give at least one width"),
        (["bench", "--repeats", "x"], "--repeats: expected a whole number"),
        (["train", "--threads", "-1", "--steps", "1"], "--threads: Invalid threads"),
        (
            ["train", "--fit", "/nope.json", "--optimizer", "gluon"],
            "--fit /nope.json: no such file",
        ),
        (["train", "--fit", "/nope.json", "--optimizer", "muon"], "--fit needs --optimizer gluon"),
        (
            ["train", "--state-dtype", "bfloat16", "--optimizer", "torch-muon"],
            "--state-dtype bfloat16: 'torch-muon' is a peer",
        ),
        (["train", "--state-dtype", "int8"], "--state-dtype: invalid choice: 'int8'"),
        (["smoothness", "--steps", "0"], "--steps: must be >= 1, got 0"),
        (["smoothness", "--every", "-2"], "--every: must be >= 1, got -2"),
        (["smoothness", "--protocols", "gpt,nope"], "--protocols: unknown protocol(s) ['nope']"),
        (["smoothness", "--sweep", "a,b"], "--sweep: expected comma-separated numbers"),
        (["bench", "--threads", "-1"], "--threads: Invalid threads"),
        (["bench", "--nope"], "--nope: unrecognized"),
        (["train", "--nope"], "--nope: unrecognized (gluon-optim train -h)"),
        (["train", "--lr", "abc"], "--lr: invalid float value: 'abc'"),
        (["train", "--opt", "momentum"], "--opt: expected KEY=VALUE"),
        # Refused by the optimizer itself, once the model is built: still no run folder.
        (["train", "--opt", "momentum=2", "--steps", "1"], "Invalid momentum: 2"),
        (["train", "--opt", "fused=qkv", "--steps", "1"], "Unknown fused 'qkv'"),
        (["compare", "--optimizers", ""], "--optimizers: give at least one value"),
        (["compare", "--optimizers", "adamw,muonn"], "--optimizers: unknown optimizer 'muonn'"),
        (["compare", "--optimizers", "muon@x"], "--optimizers: optimizer spec 'muon@x': lr 'x'"),
        (["compare", "--seeds", "x"], "--seeds: expected comma-separated whole numbers"),
        (["sweep", "--lrs", ""], "--lrs: give at least one lr"),
        (["sweep", "--optimizers", "muon@0.1"], "--optimizers: 'muon@0.1' gives an lr"),
        (["sweep", "--lrs", "abc"], "--lrs: expected comma-separated numbers, got 'abc'"),
        (["sweep", "--lr-factors", ""], "--lr-factors: give at least one value"),
        (["demo", "--steps", "0"], "--steps: unrecognized"),
        (["diff", "/nope", "/nope2"], "run_a: /nope is not a run folder"),
        (["diff", "/nope", "/nope2", "--tolerance", "-1"], "--tolerance: must be finite and >= 0"),
        (["plot", "/nope"], "runs: /nope is not a run folder"),
    ],
)
def test_user_errors_are_one_line_naming_the_option(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    takes_out = argv[0] not in ("bench", "diff", "plot")
    try:
        status = cli.main([*argv, "--out", str(tmp_path / "run")] if takes_out else argv)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1, err  # one line, no usage text, no traceback
    assert message in err[0] and err[0].startswith(f"gluon-optim {argv[0]}: error: "), err
    assert not (tmp_path / "run").exists()  # nothing trained


def test_plot_never_averages_runs_of_different_settings() -> None:
    from gluon_optim.lab.report import run_labels

    base = dataclasses.asdict(RunConfig(optimizer="muon", lr=0.02))
    configs = [
        {**base, "seed": 0},
        {**base, "seed": 1},
        {**base, "lr": 0.01},
        {**base, "optimizer": "adamw"},
    ]
    assert run_labels(configs) == ["muon lr=0.02", "muon lr=0.02", "muon lr=0.01", "adamw"]
    assert run_labels(configs[:2]) == ["muon", "muon"]  # seeds alone are averaged


def test_sweep_takes_specs_with_options(corpus: str, tmp_path: Path) -> None:
    out = tmp_path / "s"
    argv = ["sweep", "--data", corpus, "--optimizers", "unscion:momentum=0.5,unscion"]
    assert cli.main([*argv, "--lrs", "1e-3", "--out", str(out), *TINY]) == 0
    payload = json.loads((out / "sweep.json").read_text())
    assert set(payload["best"]) == {"unscion:momentum=0.5", "unscion"}
    configs = [json.loads(p.read_text())["config"] for p in out.glob("*/config.json")]
    momenta = sorted(str(c["opt_options"].get("momentum", "default")) for c in configs)
    assert momenta == ["0.5", "default"]


# -- a damaged run folder: one line naming the file, and the folder left as it was ---------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished run folder (checkpoint, config.json, metrics.jsonl), trained once."""
    root = tmp_path_factory.mktemp("finished")
    gen = torch.Generator().manual_seed(1)
    corpus = root / "c.txt"
    corpus.write_bytes(bytes(torch.randint(32, 127, (4000,), generator=gen).tolist()))
    run = root / "run"
    assert cli.main(["train", "--data", f"text:{corpus}", "--out", str(run), *TINY]) == 0
    return run


def _edit_config(edit: Callable[[dict[str, typing.Any]], object]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        saved = json.loads((run / "config.json").read_text())
        edit(saved)
        (run / "config.json").write_text(json.dumps(saved))

    return damage


def _rewrite(name: str, change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / name).write_bytes(change((run / name).read_bytes()))

    return damage


#: damage -> (the file it damages, how, what the error says about it)
DAMAGES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "unknown key": (
        "config.json",
        _edit_config(lambda saved: saved["config"].update(bogus=1)),
        "unknown key 'bogus' in \"config\"; the known keys are RunConfig's fields: model, data",
    ),
    "no config key": ("config.json", _edit_config(lambda s: s.pop("config")), 'no "config" object'),
    "config not JSON": ("config.json", _rewrite("config.json", lambda d: d[:-9]), "not JSON ("),
    "steps a string": (
        "config.json",
        _edit_config(lambda saved: saved["config"].update(steps="4")),
        '"config" key \'steps\' is "4" (a string); it must be a whole number',
    ),
    "random-bytes checkpoint": (
        "checkpoint.pt",
        _rewrite("checkpoint.pt", lambda d: bytes(torch.randint(0, 256, (len(d),)).tolist())),
        "not a readable checkpoint (no zip header",
    ),
    "truncated checkpoint": (
        "checkpoint.pt",
        _rewrite("checkpoint.pt", lambda d: d[: len(d) // 2]),
        "not a readable checkpoint (PytorchStreamReader failed reading zip archive",
    ),
    "broken metrics line": (
        "metrics.jsonl",
        _rewrite("metrics.jsonl", lambda d: b"{broken\n" + d),
        "metrics.jsonl:1: not a JSON record",
    ),
}


def _digests(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("command", "damage"),
    [("train", name) for name in DAMAGES]
    + [("plot", "unknown key"), ("plot", "no config key"), ("plot", "broken metrics line")]
    + [("diff", "random-bytes checkpoint"), ("diff", "truncated checkpoint")],
)
def test_a_damaged_run_folder_is_one_line_naming_the_file_and_left_as_it_was(
    command: str,
    damage: str,
    finished_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    name, spoil, message = DAMAGES[damage]
    spoil(run)
    before = _digests(run)
    argv = {
        "train": ["train", "--resume", str(run), "--quiet"],
        "plot": ["plot", str(run), "--out", str(tmp_path / "loss.png")],
        "diff": ["diff", str(finished_run), str(run)],
    }[command]
    capsys.readouterr()
    status = cli.main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2
    assert len(lines) == 1, lines  # one line: no traceback, none of torch's paragraphs
    assert "Traceback" not in out + err
    assert lines[0].startswith(f"gluon-optim {command}: error: {run / name}"), lines[0]
    assert message in lines[0], lines[0]
    assert _digests(run) == before  # nothing in the folder changed or went missing
