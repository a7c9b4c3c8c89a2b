"""Fault injection for the lab's runs: kill, corrupt, mix up and tear, then resume.

Every fault ends in one of three ways: *survived* (the resumed run ends bit-identical to an
uninterrupted one), *refused* (a clear one-line error, exit status 2, for a fault that cannot
be survived, such as a corrupted checkpoint), or *silent* (a different result with no error:
the failure this campaign exists to find). Run with ``make faults`` (outside CI: about two
minutes on 2 cores); it prints ``N faults, S survived, R refused, X silent`` and exits 1 if
any fault was silent.

Faults: SIGKILL at a random time during training (repeatedly resumed until done), a random
byte of a checkpoint flipped, a checkpoint truncated or zeroed, another run's checkpoint
copied in, ``config.json`` edited to another optimizer, and a torn last line of
``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STEPS = 300


def _args(corpus: Path, optimizer: str, out: Path) -> list[str]:
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
    for override in ("n_layer=1", "n_embd=32", "block_size=16"):
        args += ["--model-opt", override]
    return args


def _cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gluon_optim.lab", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    return out


def _same(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _refused(proc: subprocess.CompletedProcess[str]) -> bool:
    lines = proc.stderr.strip().splitlines()
    return proc.returncode == 2 and bool(lines) and "Traceback" not in proc.stderr


def _finish(run: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Resume ``run`` until it is done (or start it if no checkpoint was written yet)."""
    if not (run / "checkpoint.pt").exists():
        shutil.rmtree(run, ignore_errors=True)
        return _cli(args)
    return _cli(["train", "--resume", str(run), "--quiet"])


def campaign(kills: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    tally = {"survived": 0, "refused": 0, "silent": 0}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "corpus.txt"
        corpus.write_bytes(bytes(rng.randrange(32, 127) for _ in range(20000)))
        reference = tmp / "reference"
        start = time.monotonic()
        assert _cli(_args(corpus, "muon", reference)).returncode == 0
        duration = time.monotonic() - start

        def record(kind: str, outcome: str) -> None:
            tally[outcome] += 1
            print(f"{kind:<24} {outcome}", flush=True)

        # -- kills at random times, then resume until done -----------------------------------
        for i in range(kills):
            run = tmp / f"kill{i}"
            args = _args(corpus, "muon", run)
            proc = subprocess.Popen(
                [sys.executable, "-m", "gluon_optim.lab", *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            # Most of a run's first second is imports: kill inside the training loop as well.
            time.sleep(rng.uniform(0.4, 1.0) * duration)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            ckpt = run / "checkpoint.pt"
            at = torch.load(ckpt, weights_only=True)["step"] if ckpt.exists() else 0
            lines = (run / "metrics.jsonl").read_text().count("\n") if at else 0
            kind = f"kill (ckpt {at}, log {lines})"
            done = _finish(run, args)
            if done.returncode != 0:
                record(kind, "refused" if _refused(done) else "silent")
            else:
                record(kind, "survived" if _same(run, reference) else "silent")

        # -- damaged checkpoints of a half-finished run --------------------------------------
        def half(name: str, optimizer: str = "muon") -> Path:
            run = tmp / name
            args = _args(corpus, optimizer, run)
            args[args.index("--steps") + 1] = "14"  # checkpoints at 7 and 14, as a killed run
            assert _cli(args).returncode == 0
            saved = json.loads((run / "config.json").read_text())
            saved["config"]["steps"] = STEPS  # the run it belongs to is longer
            (run / "config.json").write_text(json.dumps(saved))
            return run

        def expect_refusal(kind: str, run: Path) -> None:
            proc = _cli(["train", "--resume", str(run), "--quiet"])
            record(kind, "refused" if _refused(proc) else "silent")

        for i in range(4):
            run = half(f"flip{i}")
            data = bytearray((run / "checkpoint.pt").read_bytes())
            at = rng.randrange(len(data) // 4, len(data))
            data[at] ^= 1 << rng.randrange(8)
            (run / "checkpoint.pt").write_bytes(bytes(data))
            expect_refusal("flipped bit", run)
        run = half("truncated")
        data = (run / "checkpoint.pt").read_bytes()
        (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
        expect_refusal("truncated checkpoint", run)
        run = half("zeroed")
        (run / "checkpoint.pt").write_bytes(b"\0" * len(data))
        expect_refusal("zeroed checkpoint", run)
        other = half("other", optimizer="unscion")
        run = half("mixed")
        shutil.copy(other / "checkpoint.pt", run / "checkpoint.pt")
        expect_refusal("another run's ckpt", run)
        run = half("edited")
        saved = json.loads((run / "config.json").read_text())
        saved["config"]["optimizer"] = "limuon"
        (run / "config.json").write_text(json.dumps(saved))
        expect_refusal("config.json edited", run)

        # -- a torn metrics line: survivable ---------------------------------------------------
        run = half("torn")
        with (run / "metrics.jsonl").open("a") as f:
            f.write('{"step": 15, "loss": 2.')
        done = _cli(["train", "--resume", str(run), "--quiet"])
        ok = done.returncode == 0 and _same(run, reference)
        record("torn metrics line", "survived" if ok else "silent")
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12, help="kill faults (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault times and bytes")
    args = parser.parse_args()
    tally = campaign(args.kills, args.seed)
    total = sum(tally.values())
    print(
        f"{total} faults, {tally['survived']} survived, {tally['refused']} refused, "
        f"{tally['silent']} silent"
    )
    return 1 if tally["silent"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
