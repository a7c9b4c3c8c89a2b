"""Fault injection for ``Gluon.load_state_dict``: mutate saved state dicts, load them, step.

Nine configurations (muon, scion, unscion, a hand-built group mix with AdamW, Gluon-MVR-2 with
the exact two-point gradient, LiMuon, the l0l1 radius, multi-tensor kernels, MARS with the
approximate two-point gradient) each take two steps on a tiny language model and save their
state dict. Every fault is one mutation of that dict, loaded into the optimizer that saved it
and followed by one more step. It ends in one of five ways:

* *refused*: ``load_state_dict`` (or the step after it) raised ``ValueError``, ``TypeError`` or
  ``KeyError`` naming the mutated key, and neither the parameters nor the optimizer changed;
* *accepted*: it loaded and the next step is finite and equal, bit for bit, to what the
  documented meaning of the mutation gives (an empty state is a fresh optimizer, a float64
  buffer is cast to the parameter's dtype, swapped states of equal shapes are swapped);
* *partial*: an error after something changed (the worst: no clean way back);
* *silent*: it loaded and the step differs from that meaning (state reset or ignored);
* *traceback*: an unclear error (``IndexError``, ``RuntimeError``, ``AttributeError``, or a
  message that does not name the key).

Run with ``python benchmarks/state_faults.py`` (about 20 s on 2 cores). It prints
``N state-dict faults, R refused, A accepted, P partial, S silent, T tracebacks`` and exits 1
unless there are no partial, silent or traceback cases. :func:`campaign` returns the counts.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import gluon_optim as go

VOCAB = 11
#: Exceptions whose message, when it names the mutated key, counts as a clear refusal.
CLEAR = (ValueError, TypeError, KeyError)


class Net(nn.Module):
    """Embedding -> linear -> LayerNorm -> head: matrices and vectors in every preset."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 8)
        self.fc = nn.Linear(8, 12)
        self.ln = nn.LayerNorm(12)
        self.head = nn.Linear(12, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.ln(torch.tanh(self.fc(self.embedding(x)))))
        return out


def _adamw_group(model: nn.Module) -> go.Gluon:
    """A hand-built mix: the matrices in one LMO group, everything else in an AdamW group."""
    named = list(model.named_parameters())
    matrices = [(n, p) for n, p in named if p.ndim == 2]
    vectors = [(n, p) for n, p in named if p.ndim < 2]
    return go.Gluon(
        [
            {"params": matrices, "norm": "spectral", "momentum": 0.9},
            {"params": vectors, "algorithm": "adamw", "lr": 1e-3},
        ],
        lr=0.01,
    )


#: The configurations, by name: each builds an optimizer for a fresh :class:`Net`.
CONFIGS: dict[str, Callable[[nn.Module], go.Gluon]] = {
    "muon": lambda m: go.muon(m, lr=0.02, adamw_lr=1e-3),
    "scion": lambda m: go.scion(m, lr=1e-3),
    "unscion": lambda m: go.unscion(m, lr=1e-3),
    "adamw-in-group": _adamw_group,
    "gluon-mvr2": lambda m: go.gluon_mvr(m, 2, lr=1e-3),
    "limuon": lambda m: go.limuon(m, 2, lr=0.02, adamw_lr=1e-3),
    "gluon-l0l1": lambda m: go.gluon(m, lr=1e-3, radius_policy="l0l1", l0=0.5, l1=10.0),
    "unscion-foreach": lambda m: go.unscion(m, lr=1e-3, foreach=True),
    "mars-approx": lambda m: go.gluon(
        m, lr=1e-3, estimator="mars", two_point="approx", mars_gamma=0.3
    ),
}

#: Group settings replaced by a two-element tensor (each must get its setting's own error).
TENSOR_SETTINGS = (
    "transposed",
    "constrained",
    "ns_steps",
    "eps",
    "nesterov",
    "rank",
    "oversampling",
    "rsvd_seed",
)
#: Group settings replaced by junk of the wrong kind or range.
JUNK_SETTINGS: dict[str, Any] = {
    "momentum": "x",
    "ns_steps": 0,
    "norm": "nope",
    "estimator": None,
    "lr": -1.0,
}


def _batch(k: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(k))


def _step(model: nn.Module, opt: go.Gluon, k: int) -> None:
    x = _batch(k)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        return loss

    opt.step(closure)


# -- comparing what an optimizer holds ------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    """Structural equality; tensors bit for bit (NaN equal to NaN), same shape and dtype."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.isnan(), b.isnan())
            and torch.equal(a.masked_fill(a.isnan(), 0), b.masked_fill(b.isnan(), 0))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and bool(a == b)


@dataclass
class _Held:
    """A copy of everything a fault may change: the parameters and the state dict."""

    params: list[torch.Tensor]
    state: dict[str, Any]

    @staticmethod
    def of(model: nn.Module, opt: go.Gluon) -> _Held:
        params = [p.detach().clone() for p in model.parameters()]
        return _Held(params, copy.deepcopy(opt.state_dict()))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Held)
            and _same(self.params, other.params)
            and _same(self.state, other.state)
        )


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -- the faults ---------------------------------------------------------------------------------
Meaning = Callable[[go.Gluon], None]


def _identity(opt: go.Gluon) -> None:
    """The mutation must make no difference (a dtype cast, a setting with no effect there)."""


def _fresh(opt: go.Gluon) -> None:
    """An empty state: the optimizer starts afresh, with the saved groups."""
    opt.state.clear()


@dataclass
class Fault:
    """One mutation: what it does to a saved dict, the words a refusal must contain, and what
    the optimizer must do if the dict loads (its documented meaning)."""

    kind: str
    mutate: Callable[[dict[str, Any]], None]
    names: tuple[str, ...]
    meaning: Meaning = field(default=_identity)


def _faults(saved: dict[str, Any], opt: go.Gluon) -> list[Fault]:
    """Every fault of one configuration's saved state dict."""
    ids = sorted(saved["state"])
    params = [p for group in opt.param_groups for p in group["params"]]
    saved_ids = [i for group in saved["param_groups"] for i in group["params"]]
    param_of = dict(zip(saved_ids, params, strict=True))
    out: list[Fault] = [
        Fault("drop state", lambda sd: sd.pop("state"), ("'state'",)),
        Fault("drop param_groups", lambda sd: sd.pop("param_groups"), ("param_groups",)),
        Fault("empty state", lambda sd: sd.update(state={}), (), _fresh),
        Fault(
            "every state empty",
            lambda sd: sd.update(state={i: {} for i in sd["state"]}),
            (),
            _fresh,
        ),
    ]

    def buffers(i: int) -> list[str]:
        return sorted(k for k, v in saved["state"][i].items() if k != "step" and torch.is_tensor(v))

    for i in ids:
        key = buffers(i)[0]

        def drop(sd: dict[str, Any], i: int = i, key: str = key) -> None:
            del sd["state"][i][key]

        def drop_step(sd: dict[str, Any], i: int = i) -> None:
            del sd["state"][i]["step"]

        def shape(sd: dict[str, Any], i: int = i, key: str = key) -> None:
            sd["state"][i][key] = torch.zeros(sd["state"][i][key].numel() + 1)

        def nan(sd: dict[str, Any], i: int = i, key: str = key) -> None:
            sd["state"][i][key] = torch.full_like(sd["state"][i][key], float("nan"))

        def integer(sd: dict[str, Any], i: int = i, key: str = key) -> None:
            sd["state"][i][key] = sd["state"][i][key].to(torch.int64)

        out += [
            Fault(f"drop {key} of {i}", drop, (key,)),
            Fault(f"drop step of {i}", drop_step, ("'step'",)),
            Fault(f"wrong shape {key} of {i}", shape, (key,)),
            Fault(f"NaN {key} of {i}", nan, (key,)),
            Fault(f"int64 {key} of {i}", integer, (key,)),
        ]

    first, last = ids[0], ids[-1]
    key = buffers(first)[0]

    def double(sd: dict[str, Any]) -> None:
        sd["state"][first][key] = sd["state"][first][key].double()

    def extra(sd: dict[str, Any]) -> None:
        sd["state"][first]["momentun"] = torch.zeros(1)

    def negative(sd: dict[str, Any]) -> None:
        sd["state"][first]["step"] = torch.tensor(-1.0)

    def fraction(sd: dict[str, Any]) -> None:
        sd["state"][first]["step"] = torch.tensor(1.5)

    def swap(sd: dict[str, Any]) -> None:
        states = sd["state"]
        states[first], states[last] = states[last], states[first]

    def swapped(o: go.Gluon) -> None:
        a, b = param_of[first], param_of[last]
        o.state[a], o.state[b] = o.state[b], o.state[a]

    out += [
        Fault("float64 buffer", double, (), _identity),
        Fault("extra state key", extra, ("momentun",)),
        Fault("negative step", negative, ("step",)),
        Fault("fractional step", fraction, ("step",)),
        # States of different shapes must be refused (the message says which state); states
        # of equal shapes cannot be told apart, and load as swapped.
        Fault("swapped states", swap, ("state",), swapped),
    ]

    for index, group in enumerate(saved["param_groups"]):
        vectors = [i for i in group["params"] if param_of[i].ndim < 2]
        if not vectors:
            continue

        def spectral(sd: dict[str, Any], index: int = index) -> None:
            sd["param_groups"][index]["norm"] = "spectral"

        def spectral_in_memory(o: go.Gluon, index: int = index) -> None:
            o.param_groups[index]["norm"] = "spectral"

        # An AdamW group does not read its norm: there the change is accepted, and means no
        # more than setting it on the live group. An LMO group's vectors must be refused.
        kind = f"norm spectral on vectors, group {index}"
        if group["algorithm"] == "lmo":
            out.append(Fault(kind, spectral, ("spectral",)))
        else:
            out.append(Fault(kind, spectral, (), spectral_in_memory))
    for name, junk in JUNK_SETTINGS.items():

        def set_junk(sd: dict[str, Any], name: str = name, junk: Any = junk) -> None:
            sd["param_groups"][0][name] = junk

        names = ("learning rate",) if name == "lr" else (name,)
        out.append(Fault(f"junk {name}", set_junk, names))
    for name in TENSOR_SETTINGS:

        def set_tensor(sd: dict[str, Any], name: str = name) -> None:
            sd["param_groups"][0][name] = torch.tensor([1, 2])

        out.append(Fault(f"tensor {name}", set_tensor, (name,)))
    return out


# -- running them -------------------------------------------------------------------------------
def _classify(error: BaseException | None, fault: Fault, changed: bool) -> str:
    if error is None:
        return "accepted"
    if changed:
        return "partial"
    clear = isinstance(error, CLEAR) and all(n in str(error) for n in fault.names)
    return "refused" if clear and fault.names else "traceback"


def _run_one(
    build: Callable[[nn.Module], go.Gluon],
    weights: dict[str, torch.Tensor],
    saved: dict[str, Any],
    fault: Fault,
) -> tuple[str, str]:
    """The outcome of one fault and a one-line reason."""

    def restored() -> tuple[nn.Module, go.Gluon]:
        model = Net()
        model.load_state_dict(weights)
        opt = build(model)
        opt.load_state_dict(copy.deepcopy(saved))
        return model, opt

    model, opt = restored()
    mutated = copy.deepcopy(saved)
    fault.mutate(mutated)
    before = _Held.of(model, opt)
    try:
        opt.load_state_dict(mutated)
    except Exception as error:  # noqa: BLE001 (every outcome is classified)
        outcome = _classify(error, fault, _Held.of(model, opt) != before)
        return outcome, f"load: {type(error).__name__}: {error}"
    loaded = _Held.of(model, opt)
    try:
        _step(model, opt, 2)
    except Exception as error:  # noqa: BLE001
        outcome = _classify(error, fault, _Held.of(model, opt) != loaded)
        return outcome, f"step: {type(error).__name__}: {error}"
    if not _finite(model):
        return "silent", "loaded; the step is not finite"
    # What the documented meaning gives: the unmutated state, with the meaning applied.
    ref_model, ref_opt = restored()
    fault.meaning(ref_opt)
    _step(ref_model, ref_opt, 2)
    if _Held.of(model, opt) == _Held.of(ref_model, ref_opt):
        return "accepted", "loaded; the step is what its meaning gives"
    return "silent", "loaded; the step differs from its meaning (state reset or ignored?)"


def campaign(verbose: bool = False, configs: Iterable[str] | None = None) -> dict[str, int]:
    """Run every fault of every configuration (or of ``configs``); the counts of each outcome."""
    chosen = list(CONFIGS) if configs is None else list(configs)
    tally = {"faults": 0, "refused": 0, "accepted": 0, "partial": 0, "silent": 0, "tracebacks": 0}
    key_of = {"traceback": "tracebacks"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in chosen:
            build = CONFIGS[name]
            torch.manual_seed(0)
            model = Net()
            opt = build(model)
            for k in range(2):
                _step(model, opt, k)
            weights = copy.deepcopy(model.state_dict())
            saved = copy.deepcopy(opt.state_dict())
            for fault in _faults(saved, opt):
                outcome, why = _run_one(build, weights, saved, fault)
                tally["faults"] += 1
                tally[key_of.get(outcome, outcome)] += 1
                if verbose or outcome not in ("refused", "accepted"):
                    print(f"{name:<16} {fault.kind:<36} {outcome:<9} {why[:150]}", flush=True)
    finally:
        torch.set_num_threads(threads)
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = parser.parse_args()
    t = campaign(verbose=args.verbose)
    print(
        f"{t['faults']} state-dict faults, {t['refused']} refused, {t['accepted']} accepted, "
        f"{t['partial']} partial, {t['silent']} silent, {t['tracebacks']} tracebacks"
    )
    return 1 if t["partial"] or t["silent"] or t["tracebacks"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
