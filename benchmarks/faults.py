"""Fault injection for the lab's runs: kill, corrupt, mix up and tear, then resume.

Two campaigns. The *run-folder* campaign damages a run folder and runs
``gluon-optim train --resume`` on it in a fresh process; each fault ends in one of five ways:

* *survived*: the resumed run ends bit-identical to an uninterrupted one;
* *refused*: exit status 2 with one line on stderr (no traceback), for a fault that cannot be
  survived (a corrupted checkpoint, a config.json that is not one), and every file of the run
  folder is as it was before the attempt;
* *silent*: the command succeeded with a different result (the failure this campaign exists to
  find);
* *partial*: refused, but the run folder's files were changed (created, removed or rewritten);
* *traceback*: any other failure: "Traceback" in the output, more than one line on stderr, no
  line at all, or an exit status other than 2.

Run-folder faults: SIGKILL at a random time during training (repeatedly resumed until done); a
checkpoint with a flipped byte, truncated, zeroed, emptied, of random bytes, deleted, holding
only the model's weights, with its step edited, another run's (another optimizer, another model
size, and another model size in the format of checkpoints before 0.2.0, which carry no
configuration and no checksum); ``config.json`` edited to another optimizer or to an unknown
optimizer, with an unknown key, a misspelt key, without its ``config`` key, a JSON list, not
JSON, torn, empty, random bytes, values of the wrong type, deleted; ``metrics.jsonl`` with a
torn last line, deleted (the resumed run's weights are what matters: survived), garbage, a
broken line in the middle, a record of the wrong type, random bytes; and stale temporary files
of a killed write.

The *state-dict* campaign is ``benchmarks/state_faults.py``'s :func:`campaign` (mutated
``Gluon`` state dicts loaded and stepped, in this process); its counts are folded into the
report, its *accepted* (loaded, and the step is what the mutation means) counted as survived.

Run with ``make faults`` (outside CI: about three minutes on 2 cores). The last line reads
``N faults, S survived, R refused, X silent, P partial, T tracebacks`` (both campaigns) and the
exit status is 1 if any fault was silent, partial or a traceback.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STEPS = 300
OUTCOMES = ("survived", "refused", "silent", "partial", "traceback")


def _args(corpus: Path, optimizer: str, out: Path, n_embd: int = 32) -> list[str]:
    """``gluon-optim train`` arguments of the campaign's run (a 1-layer GPT, one thread)."""
    options = {
        "model": "gpt-tiny",
        "data": f"text:{corpus}",
        "optimizer": optimizer,
        "steps": STEPS,
        "batch-size": 4,
        "eval-every": 100,
        "eval-batches": 2,
        "checkpoint-every": 7,
        "threads": 1,
        "out": out,
    }
    args = ["train", "--quiet"]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    for override in ("n_layer=1", f"n_embd={n_embd}", "block_size=16"):
        args += ["--model-opt", override]
    return args


def _cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gluon_optim.lab", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    return out


def _same(a: Path, b: Path) -> bool:
    try:
        wa, wb = _weights(a), _weights(b)
    except Exception:  # the command said it succeeded, but left no readable checkpoint
        return False
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _files(run: Path) -> dict[str, str]:
    """Every file under ``run`` (relative path) and the SHA-256 of its bytes."""
    if not run.is_dir():
        return {}
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def _one_line(proc: subprocess.CompletedProcess[str]) -> bool:
    """Exit status 2 with exactly one non-empty line on stderr, and no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    text = proc.stdout + proc.stderr
    return proc.returncode == 2 and len(lines) == 1 and "Traceback" not in text


def _outcome(
    proc: subprocess.CompletedProcess[str], run: Path, reference: Path, before: dict[str, str]
) -> str:
    if proc.returncode == 0 and "Traceback" not in proc.stdout + proc.stderr:
        return "survived" if _same(run, reference) else "silent"
    if not _one_line(proc):
        return "traceback"
    return "refused" if _files(run) == before else "partial"


def _finish(run: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Resume ``run`` until it is done (or start it if no checkpoint was written yet)."""
    if not (run / "checkpoint.pt").exists():
        shutil.rmtree(run, ignore_errors=True)
        return _cli(args)
    return _cli(["train", "--resume", str(run), "--quiet"])


# -- the damage done to a copy of a half-finished run (checkpoints at steps 7 and 14) -----------


def _edit_config(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        saved = json.loads((run / "config.json").read_text())
        edit(saved)
        (run / "config.json").write_text(json.dumps(saved))

    return damage


def _write(name: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """A damage that replaces file ``name`` by ``data`` (or by ``data(its bytes)``)."""

    def damage(run: Path) -> None:
        path = run / name
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)

    return damage


def _delete(name: str) -> Callable[[Path], None]:
    return lambda run: (run / name).unlink()


def _edit_checkpoint(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        out = edit(ckpt)
        torch.save(ckpt if out is None else out, run / "checkpoint.pt")

    return damage


def _rename_key(saved: dict[str, Any]) -> None:
    saved["config"]["step"] = saved["config"].pop("steps")


def _middle_line(data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    lines[len(lines) // 2] = b'{"step": 5, "lo\n'
    return b"".join(lines)


def _stale_temps(run: Path) -> None:
    (run / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"torn")
    (run / "config.json.tmp").write_text('{"config": ')
    (run / ".metrics.jsonl.tmp").write_text('{"step": 1')


def _old_format(ckpt: dict[str, Any]) -> None:
    del ckpt["config"], ckpt["checksum"]


def _damages(rng: random.Random, templates: dict[str, Path]) -> list[tuple[str, Any]]:
    """(kind, damage) of the half-run faults; a damage is a function of the copied run folder."""

    def flip(data: bytes) -> bytes:
        out = bytearray(data)
        at = rng.randrange(len(out) // 4, len(out))
        out[at] ^= 1 << rng.randrange(8)
        return bytes(out)

    def copy_from(template: str, edit: Callable[[dict[str, Any]], Any] | None = None) -> Any:
        def damage(run: Path) -> None:
            shutil.copy(templates[template] / "checkpoint.pt", run / "checkpoint.pt")
            if edit is not None:
                _edit_checkpoint(edit)(run)

        return damage

    ckpt = "checkpoint.pt"
    cases: list[tuple[str, Any]] = [(f"flipped bit {i + 1}", _write(ckpt, flip)) for i in range(4)]
    cases += [
        ("truncated checkpoint", _write(ckpt, lambda d: d[: len(d) // 2])),
        ("zeroed checkpoint", _write(ckpt, lambda d: bytes(len(d)))),
        ("empty checkpoint", _write(ckpt, b"")),
        ("random-bytes checkpoint", _write(ckpt, lambda d: rng.randbytes(len(d)))),
        ("deleted checkpoint", _delete(ckpt)),
        ("weights-only checkpoint", _edit_checkpoint(lambda c: c["model"])),
        ("checkpoint step edited", _edit_checkpoint(lambda c: c.update(step=10**6))),
        ("another run's ckpt", copy_from("unscion")),
        ("other model size ckpt", copy_from("wide")),
        ("old-format other size", copy_from("wide", _old_format)),
        ("config: other optimizer", _edit_config(lambda s: s["config"].update(optimizer="limuon"))),
        ("config: unknown optim.", _edit_config(lambda s: s["config"].update(optimizer="sgdx"))),
        ("config: unknown key", _edit_config(lambda s: s["config"].update(bogus=1))),
        ("config: misspelt key", _edit_config(_rename_key)),
        ("config: no config key", _edit_config(lambda s: s.pop("config"))),
        ("config: a JSON list", _write("config.json", b"[1, 2, 3]\n")),
        ("config: not JSON", _write("config.json", b"model = gpt-tiny\nsteps = 300\n")),
        ("config: torn", _write("config.json", lambda d: d[: len(d) // 2])),
        ("config: empty", _write("config.json", b"")),
        ("config: random bytes", _write("config.json", lambda d: rng.randbytes(len(d)))),
        ("config: steps a string", _edit_config(lambda s: s["config"].update(steps="300"))),
        ("config: options a list", _edit_config(lambda s: s["config"].update(model_options=[]))),
        ("config: deleted", _delete("config.json")),
        ("metrics: deleted", _delete("metrics.jsonl")),
        ("metrics: garbage", _write("metrics.jsonl", b"garbage\nmore garbage\n")),
        ("metrics: broken line", _write("metrics.jsonl", _middle_line)),
        ("metrics: loss a string", _write("metrics.jsonl", b'{"step": 1, "loss": "2.5"}\n')),
        ("metrics: random bytes", _write("metrics.jsonl", lambda d: rng.randbytes(len(d)))),
        (
            "metrics: torn last line",
            _write("metrics.jsonl", lambda d: d + b'{"step": 15, "loss": 2.'),
        ),
        ("stale temporary files", _stale_temps),
    ]
    return cases


def campaign(kills: int, seed: int) -> dict[str, int]:
    """The run-folder campaign; the count of each outcome (see the module docstring)."""
    rng = random.Random(seed)
    tally = dict.fromkeys(OUTCOMES, 0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "corpus.txt"
        corpus.write_bytes(bytes(rng.randrange(32, 127) for _ in range(20000)))
        reference = tmp / "reference"
        start = time.monotonic()
        assert _cli(_args(corpus, "muon", reference)).returncode == 0
        duration = time.monotonic() - start

        def record(kind: str, outcome: str, proc: subprocess.CompletedProcess[str]) -> None:
            tally[outcome] += 1
            line = f"{kind:<28} {outcome}"
            if outcome != "survived":
                err = proc.stderr.strip().splitlines()
                line += f"  {err[-1] if err else f'(exit {proc.returncode}, no stderr)'}"[:150]
            print(line, flush=True)

        # -- kills at random times, then resume until done -----------------------------------
        for i in range(kills):
            run = tmp / f"kill{i}"
            args = _args(corpus, "muon", run)
            killed = subprocess.Popen(
                [sys.executable, "-m", "gluon_optim.lab", *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            # Most of a run's first second is imports: kill inside the training loop as well.
            time.sleep(rng.uniform(0.4, 1.0) * duration)
            killed.send_signal(signal.SIGKILL)
            killed.wait()
            ckpt = run / "checkpoint.pt"
            at = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else 0
            lines = (run / "metrics.jsonl").read_text().count("\n") if at else 0
            before = _files(run)
            done = _finish(run, args)
            record(f"kill (ckpt {at}, log {lines})", _outcome(done, run, reference, before), done)

        # -- damaged copies of half-finished runs --------------------------------------------
        def half(name: str, optimizer: str = "muon", n_embd: int = 32) -> Path:
            run = tmp / name
            args = _args(corpus, optimizer, run, n_embd)
            args[args.index("--steps") + 1] = "14"  # checkpoints at 7 and 14, as a killed run
            assert _cli(args).returncode == 0
            saved = json.loads((run / "config.json").read_text())
            saved["config"]["steps"] = STEPS  # the run it belongs to is longer
            (run / "config.json").write_text(json.dumps(saved))
            return run

        templates = {
            "muon": half("half"),
            "unscion": half("half-unscion", optimizer="unscion"),
            "wide": half("half-wide", n_embd=48),
        }
        for i, (kind, damage) in enumerate(_damages(rng, templates)):
            run = tmp / f"fault{i}"
            shutil.copytree(templates["muon"], run)
            damage(run)
            before = _files(run)
            proc = _cli(["train", "--resume", str(run), "--quiet"])
            record(kind, _outcome(proc, run, reference, before), proc)
    return tally


def _state_campaign() -> dict[str, int]:
    """``benchmarks/state_faults.py``'s campaign (loaded by path: it is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "state_faults", Path(__file__).with_name("state_faults.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    counts: dict[str, int] = module.campaign(verbose=False)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12, help="kill faults (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault times and bytes")
    parser.add_argument("--no-state", action="store_true", help="leave out the state-dict campaign")
    args = parser.parse_args()
    t0 = time.monotonic()
    run = campaign(args.kills, args.seed)
    print(
        f"run folders: {sum(run.values())} faults, {run['survived']} survived, "
        f"{run['refused']} refused, {run['silent']} silent, {run['partial']} partial, "
        f"{run['traceback']} tracebacks ({time.monotonic() - t0:.0f} s)",
        flush=True,
    )
    total = dict(run)
    if not args.no_state:
        t1 = time.monotonic()
        sd = _state_campaign()
        print(
            f"state dicts: {sd['faults']} faults, {sd['accepted']} accepted (counted as "
            f"survived), {sd['refused']} refused, {sd['silent']} silent, {sd['partial']} "
            f"partial, {sd['tracebacks']} tracebacks ({time.monotonic() - t1:.0f} s)",
            flush=True,
        )
        total["survived"] += sd["accepted"]
        total["refused"] += sd["refused"]
        total["silent"] += sd["silent"]
        total["partial"] += sd["partial"]
        total["traceback"] += sd["tracebacks"]
    print(
        f"{sum(total.values())} faults, {total['survived']} survived, {total['refused']} "
        f"refused, {total['silent']} silent, {total['partial']} partial, "
        f"{total['traceback']} tracebacks"
    )
    return 1 if total["silent"] or total["partial"] or total["traceback"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
