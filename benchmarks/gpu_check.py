"""GPU readiness in one command: the CUDA tests, a CUDA step benchmark, the lab on CUDA.

Run with ``make gpu-check`` (or ``python benchmarks/gpu_check.py --help``) on a machine with a
CUDA device. No GPU has been lent to this project yet, so none of this has run on one; the
script exists so that the first machine that has one answers three questions in one go:

1. Do the CUDA tests pass? ``pytest -k "gpu or cuda"``: ``-k`` matches marker names too, so
   this is every ``@pytest.mark.gpu`` test plus CUDA tests named so but not marked.
2. What does one ``step()`` cost? :func:`bench_direction_step`: the bf16 Newton–Schulz
   direction step of ``go.muon`` (torch's kernel, and the fast recipe) against
   ``torch.optim.Muon`` on the same fp32 matrices (a 12-layer nanoGPT's hidden weights), eager
   and under ``compile=`` (``torch.compile`` of Newton–Schulz), with each result's distance to
   torch's iterates. Written as JSON under ``runs/gpu-check/`` after every stage, so a run cut
   short keeps what it measured.
3. Does the lab train on CUDA? Only where its run settings have a ``device`` (today they do
   not: ``gluon-optim train`` runs on the CPU), so the result says so instead.

Without CUDA (``torch.cuda.is_available()`` false) it prints one line and exits 0, so CI and
CPU machines can run it. The benchmark takes the device as a parameter; the CPU tests run it on
tiny shapes so its code is exercised without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

import gluon_optim as go

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "gpu-check"
LR = 0.02  # Keller Jordan's Muon lr; the ratio of step times does not depend on it


@dataclasses.dataclass(frozen=True)
class Contender:
    """One benchmarked optimizer over a list of matrices."""

    name: str
    build: Callable[[list[nn.Parameter]], Optimizer]


def contenders(compile_backend: str) -> list[Contender]:
    """``torch.optim.Muon`` (the reference, first), then ``go.muon`` eager and compiled.

    All run Newton–Schulz in bfloat16 with 5 steps, momentum 0.95 and Nesterov (both
    libraries' defaults). ``go.muon`` with torch's kernel gives torch's iterates bit for bit
    on the CPU; the fast recipe (``go.presets.FAST_NS``) trades that for fewer multiply-adds.
    """

    def torch_muon(ps: list[nn.Parameter]) -> Optimizer:
        return torch.optim.Muon(ps, lr=LR, weight_decay=0.0, adjust_lr_fn="original")

    def ours(**options: Any) -> Callable[[list[nn.Parameter]], Optimizer]:
        def build(ps: list[nn.Parameter]) -> Optimizer:
            return go.muon(ps, lr=LR, compute_dtype="bfloat16", **options)

        return build

    fast = go.presets.FAST_NS
    rows = [
        Contender("torch.optim.Muon", torch_muon),
        Contender("go.muon", ours()),
        Contender("go.muon fast", ours(**fast)),
    ]
    if compile_backend:
        rows += [
            Contender(f"go.muon compile={compile_backend}", ours(compile=compile_backend)),
            Contender(
                f"go.muon fast compile={compile_backend}", ours(compile=compile_backend, **fast)
            ),
        ]
    return rows


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without a synchronize the clock would stop at launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matrices(
    shapes: Sequence[tuple[int, int]], seed: int, device: torch.device
) -> tuple[list[Tensor], list[Tensor]]:
    """Seeded initial weights and gradients, drawn on the CPU so every device sees the same."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(*s, generator=gen) / s[1] ** 0.5 for s in shapes]
    grads = [torch.randn(*s, generator=gen) for s in shapes]
    return [w.to(device) for w in weights], [g.to(device) for g in grads]


def bench_direction_step(
    device: torch.device | str = "cuda",
    *,
    widths: Sequence[int] = (768, 1024),
    n_layer: int = 12,
    repeats: int = 20,
    warmup: int = 5,
    compile_backend: str = "inductor",
    seed: int = 0,
) -> dict[str, Any]:
    """Time one ``step()`` of each of :func:`contenders` on ``device``, all in this one run.

    Per width the fp32 hidden matrices of an ``n_layer`` nanoGPT (``gpt_shapes``) get seeded
    values and gradients, the same for every contender. Each takes ``warmup`` untimed steps
    (where ``torch.compile`` compiles; their total is ``warmup_s``), then the contenders take
    ``repeats`` timed steps in turn, so background load and clock changes hit them alike. The
    gradients are copied in outside the timed region. After the last step each contender's
    weights are compared with ``torch.optim.Muon``'s: every one took the same steps on the same
    gradients, so ``max_abs_diff`` 0 means torch's iterates bit for bit.

    Returns:
        ``{"meta": ..., "widths": {str(w): {"n_matrices", "n_params", "rows": [{"name",
        "median_ms", "q1_ms", "q3_ms", "min_ms", "ratio", "warmup_s", "max_abs_diff",
        "bit_identical"}, ...]}}}``; ``ratio`` is the median over ``torch.optim.Muon``'s.
    """
    # The lab (numpy, scikit-learn and the rest) is imported only where it is used, so the
    # skip path of main() imports no more than torch and the library.
    from gluon_optim.lab.bench.step import gpt_shapes
    from gluon_optim.lab.bench.timing import quartiles

    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    dev = torch.device(device)
    table = contenders(compile_backend)
    meta = {**device_meta(dev), "repeats": repeats, "warmup": warmup, "n_layer": n_layer}
    meta.update(seed=seed, compile_backend=compile_backend, params="float32", ns="bfloat16")
    out: dict[str, Any] = {"meta": meta, "widths": {}}
    for width in widths:
        shapes = gpt_shapes(width, n_layer)
        weights, grads = _matrices(shapes, seed, dev)
        runs: list[tuple[Contender, list[nn.Parameter], Optimizer]] = []
        for c in table:
            params = [nn.Parameter(w.clone()) for w in weights]
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            runs.append((c, params, c.build(params)))
        warm: dict[str, float] = {}
        for c, params, opt in runs:
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(warmup):
                _set_grads(params, grads)
                opt.step()
            _sync(dev)
            warm[c.name] = time.perf_counter() - t0
        times: dict[str, list[float]] = {c.name: [] for c in table}
        for _ in range(repeats):
            for c, params, opt in runs:
                _set_grads(params, grads)
                _sync(dev)
                t0 = time.perf_counter()
                opt.step()
                _sync(dev)
                times[c.name].append((time.perf_counter() - t0) * 1e3)
        reference = runs[0][1]
        rows: list[dict[str, Any]] = []
        for c, params, _opt in runs:
            ts = times[c.name]
            q1, q3 = quartiles(ts)
            diff = max(
                (p.detach() - r.detach()).abs().max().item()
                for p, r in zip(params, reference, strict=True)
            )
            rows.append(
                {
                    "name": c.name,
                    "median_ms": statistics.median(ts),
                    "q1_ms": q1,
                    "q3_ms": q3,
                    "min_ms": min(ts),
                    "warmup_s": warm[c.name],
                    "max_abs_diff": diff,
                    "bit_identical": diff == 0.0,
                }
            )
        for row in rows:
            row["ratio"] = row["median_ms"] / rows[0]["median_ms"]
        out["widths"][str(width)] = {
            "n_matrices": len(shapes),
            "n_params": sum(m * n for m, n in shapes),
            "rows": rows,
        }
    return out


def _set_grads(params: Sequence[nn.Parameter], grads: Sequence[Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        assert p.grad is not None
        p.grad.copy_(g)


def device_meta(device: torch.device) -> dict[str, Any]:
    """Versions and the device's name: a GPU timing is meaningless without the card."""
    meta: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    return meta


def format_bench(result: dict[str, Any]) -> str:
    """Markdown tables of a :func:`bench_direction_step` result, one per width."""
    meta = result["meta"]
    lines = [
        f"Optimizer step on {meta.get('gpu', meta['device'])}, torch {meta['torch']}: fp32 "
        f"weights, bf16 Newton–Schulz, median of {meta['repeats']} after {meta['warmup']} "
        "warm-up steps"
    ]
    for width, block in result["widths"].items():
        lines += [
            "",
            f"width {width}: {block['n_matrices']} matrices, {block['n_params']:,} parameters",
            "",
            "| optimizer | median ms | IQR ms | vs torch Muon | warm-up s | max abs diff |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in block["rows"]:
            lines.append(
                f"| {r['name']} | {r['median_ms']:.3f} | {r['q1_ms']:.3f}-{r['q3_ms']:.3f} "
                f"| {r['ratio']:.2f} | {r['warmup_s']:.1f} | {r['max_abs_diff']:.3g} |"
            )
    return "\n".join(lines)


def run_cuda_tests() -> dict[str, Any]:
    """The CUDA tests in a pytest of their own; its output goes straight to the console."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    cmd += ["-k", "gpu or cuda"]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    return {"command": cmd[1:], "returncode": rc, "seconds": round(time.perf_counter() - t0, 1)}


def lab_on_cuda(out: Path) -> dict[str, Any]:
    """A short ``gluon-optim train`` on CUDA where the lab has a device setting; else why not."""
    from gluon_optim.lab.train import RunConfig

    if "device" not in {f.name for f in dataclasses.fields(RunConfig)}:
        return {
            "status": "not supported",
            "why": "the lab's run settings have no device (RunConfig has no `device` field): "
            "gluon-optim train runs on the CPU only",
        }
    # The CLI's options are generated from RunConfig's fields, so the field gives --device.
    cmd = [sys.executable, "-m", "gluon_optim.lab", "train", "--device", "cuda"]
    cmd += ["--model", "gpt-tiny", "--optimizer", "muon", "--steps", "50", "--eval-every", "25"]
    cmd += ["--quiet", "--out", str(out / "lab")]
    rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    return {"status": "ran" if rc == 0 else "failed", "command": cmd[1:], "returncode": rc}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the JSON")
    parser.add_argument("--widths", default="768,1024", help="comma-separated model widths")
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", default="inductor", help="backend of the compiled rows")
    parser.add_argument("--skip-tests", action="store_true", help="benchmark and lab only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            f"gpu-check: skipped: no CUDA device (torch {torch.__version__}: "
            "torch.cuda.is_available() is False)"
        )
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result: dict[str, Any] = {"meta": device_meta(torch.device("cuda"))}

    def save() -> None:
        # After every stage: a run stopped by a time limit keeps what it has measured.
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    save()
    if not args.skip_tests:
        result["tests"] = run_cuda_tests()
        save()
    result["bench"] = bench_direction_step(
        "cuda",
        widths=[int(w) for w in args.widths.split(",") if w],
        n_layer=args.n_layer,
        repeats=args.repeats,
        warmup=args.warmup,
        compile_backend=args.compile,
    )
    save()
    print(format_bench(result["bench"]))
    result["lab"] = lab_on_cuda(args.out)
    save()
    tests_rc = result.get("tests", {}).get("returncode", 0)
    lab = result["lab"]
    print(f"gpu-check: tests rc {tests_rc}; lab: {lab['status']} ({lab.get('why', '')}); {path}")
    return 1 if tests_rc != 0 or lab["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
