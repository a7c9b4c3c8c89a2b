"""Golden iterates: every lab optimizer, 20 steps from a fixed seed, against a recorded file.

The file ``tests/golden/lab_optimizers.json`` was recorded before the step pipeline was
redesigned (0.1.0 code), so this test pins that the redesign changed no arithmetic. Each
parameter is stored as the SHA-256 of its bytes plus two float64 summaries. On the platform it
was recorded on (same torch version and CPU capability) the hashes must match: bit-identical.
Elsewhere BLAS kernels may round differently, so only the summaries are compared, to 1e-4.

A new lab optimizer or case is added to the file with ``--record``; ``--record --all`` records
everything again (only when an arithmetic change is intended: say so in the commit)::

    .venv/bin/python tests/test_golden.py --record
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gluon_optim.lab import optimizers as registry
from gluon_optim.lab.models import build_model

GOLDEN = Path(__file__).parent / "golden" / "lab_optimizers.json"
STEPS = 20

# Every lab optimizer on the GPT, the conv-capable ones on the CNN too, plus settings that reach
# the code paths the lab names do not (radius policies, foreach, full-rank STORM, approx modes).
_GPT = sorted(registry.OPTIMIZERS)
_CNN = ["muon", "scion", "unscion", "gluon", "limuon", "gluon-mvr2"]
_EXTRA: dict[str, tuple[str, dict[str, Any]]] = {
    "gluon+l0l1": ("gluon", {"settings": {"hidden": {"RADIUS": "l0l1", "l0": 0.5, "l1": 40.0}}}),
    "gluon+l0l1-momentum": (
        "gluon",
        {"settings": {"hidden": {"RADIUS": "l0l1", "l1": 40.0, "radius_source": "momentum"}}},
    ),
    "gluon+theory_decay": ("gluon", {"RADIUS": "theory_decay"}),
    "unscion+foreach": ("unscion", {"foreach": True}),
    "muon+foreach": ("muon", {"foreach": True}),
    "limuon-fullrank": ("limuon", {"low_rank": False}),
    "limuon-approx": ("limuon", {"two_point": "approx"}),
    "scion+wd": ("scion", {"weight_decay": 0.1}),
}


def _radius_key() -> str:
    """The group key of the radius policy in the installed version."""
    from gluon_optim.optimizer import DEFAULTS

    return "radius_policy" if "radius_policy" in DEFAULTS else "radius"


def _rename(options: Any, key: str) -> Any:
    if isinstance(options, dict):
        return {(key if k == "RADIUS" else k): _rename(v, key) for k, v in options.items()}
    return options


@contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(1234)
    if kind == "gpt":
        return build_model("gpt-tiny", vocab_size=64, block_size=16, n_embd=32)
    return build_model("cnn-small", in_channels=1, num_classes=10, widths=(8, 16), stem_width=8)


def _batches(kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(99)
    out = []
    for _ in range(STEPS):
        if kind == "gpt":
            x = torch.randint(0, 64, (4, 17), generator=gen)
            out.append((x[:, :-1], x[:, 1:]))
        else:
            out.append((torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,))))
    return out


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def run(kind: str, name: str, options: dict[str, Any]) -> dict[str, list[Any]]:
    """Parameters after ``STEPS`` steps: ``{param: [sha256, sum, abs_sum]}``."""
    model = _model(kind)
    lr, opts = registry.resolve(name, "gpt-tiny" if kind == "gpt" else "cnn-small", None, {})
    opts = {**opts, **_rename(options, _radius_key())}
    optimizers = registry.build(name, model, lr, opts)
    for x, y in _batches(kind):
        closure: Callable[[], torch.Tensor]

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            for opt in optimizers:
                opt.zero_grad()
            loss = _loss(model, x, y)
            loss.backward()
            return loss

        needs = any(getattr(opt, "needs_closure", lambda: False)() for opt in optimizers)
        if needs:
            optimizers[0].step(closure)
        else:
            closure()
            for opt in optimizers:
                opt.step()
    out: dict[str, list[Any]] = {}
    for pname, p in model.named_parameters():
        data = p.detach().contiguous()
        digest = hashlib.sha256(data.numpy().tobytes()).hexdigest()
        out[pname] = [digest, float(data.double().sum()), float(data.double().abs().sum())]
    return out


def cases() -> list[tuple[str, str, str, dict[str, Any]]]:
    """``(case id, model kind, lab optimizer, extra options)`` for every recorded run."""
    out = [(f"gpt/{n}", "gpt", n, {}) for n in _GPT]
    out += [(f"cnn/{n}", "cnn", n, {}) for n in _CNN]
    out += [(f"gpt/{case}", "gpt", n, o) for case, (n, o) in _EXTRA.items()]
    return out


def platform() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def record(everything: bool) -> None:
    """Record the cases the file lacks (all of them with ``everything``)."""
    runs = {} if everything or not GOLDEN.exists() else _golden()["runs"]
    with _one_thread():
        for cid, kind, n, o in cases():
            if cid not in runs:
                runs[cid] = run(kind, n, o)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"platform": platform(), "runs": runs}, indent=1) + "\n")


def _golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GOLDEN.read_text())
    return data


@pytest.mark.parametrize(("cid", "kind", "name", "options"), cases(), ids=[c[0] for c in cases()])
def test_lab_optimizer_iterates_match_the_golden_file(
    cid: str, kind: str, name: str, options: dict[str, Any]
) -> None:
    golden = _golden()
    expected = golden["runs"][cid]
    with _one_thread():
        got = run(kind, name, options)
    assert sorted(got) == sorted(expected)
    same_platform = golden["platform"] == platform()
    for pname, (digest, total, abs_total) in expected.items():
        if same_platform:
            assert got[pname][0] == digest, f"{cid}: {pname} is not bit-identical"
        else:
            assert math.isclose(got[pname][1], total, rel_tol=1e-4, abs_tol=1e-4), pname
            assert math.isclose(got[pname][2], abs_total, rel_tol=1e-4), pname


def test_every_lab_optimizer_has_a_golden_run() -> None:
    recorded = {cid.split("/", 1)[1] for cid in _golden()["runs"] if cid.startswith("gpt/")}
    assert set(registry.OPTIMIZERS) <= recorded


if __name__ == "__main__":
    if sys.argv[1:] not in (["--record"], ["--record", "--all"]):
        raise SystemExit("usage: python tests/test_golden.py --record [--all]")
    record(everything=sys.argv[2:] == ["--all"])
