"""load_state_dict: what it accepts, with which meaning, and what it refuses before any change.

Every refusal is checked against a snapshot of the parameters and of ``opt.state_dict()``
(deep copies) taken before the call: a refused dict changes nothing. Every accepted dict is
checked against the meaning it is documented to have (docs/optimizer.md, "Errors"): the next
step equals, bit for bit, the step of an optimizer given that meaning in memory.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

import gluon_optim as go

VOCAB = 11


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


Build = Callable[[nn.Module], go.Gluon]
#: One configuration per kind of state: the EMA, AdamW, MVR-2 with the previous iterate, the
#: low-rank factors, the previous gradient (approx), and the EMA at momentum 0 (no buffer).
CONFIGS: dict[str, Build] = {
    "unscion": lambda m: go.unscion(m, lr=1e-3),
    "muon": lambda m: go.muon(m, lr=0.02, adamw_lr=1e-3),
    "gluon-mvr2": lambda m: go.gluon_mvr(m, 2, lr=1e-3),
    "limuon": lambda m: go.limuon(m, 2, lr=0.02, adamw_lr=1e-3),
    "mars-approx": lambda m: go.gluon(m, lr=1e-3, estimator="mars", two_point="approx"),
    "momentum-0": lambda m: go.gluon(m, lr=1e-3, momentum=0.0),
}


def _step(model: nn.Module, opt: go.Gluon, k: int) -> None:
    x = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(k))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        return loss

    opt.step(closure)


def _stepped(build: Build) -> tuple[Net, go.Gluon]:
    torch.manual_seed(0)
    model = Net()
    opt = build(model)
    for k in range(2):
        _step(model, opt, k)
    return model, opt


def _copy(model: Net, opt: go.Gluon, build: Build) -> tuple[Net, go.Gluon]:
    """A second model and optimizer in the same state (what a resume builds)."""
    twin = Net()
    twin.load_state_dict(model.state_dict())
    twin_opt = build(twin)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    return twin, twin_opt


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _held(model: nn.Module, opt: go.Gluon) -> tuple[list[torch.Tensor], dict[str, Any]]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _refused(model: nn.Module, opt: go.Gluon, bad: Any, error: type[Exception], match: str) -> None:
    """``bad`` is refused with ``error`` matching ``match``, and nothing changed."""
    before = _held(model, opt)
    with pytest.raises(error, match=match):
        opt.load_state_dict(bad)
    assert _same(_held(model, opt), before)


def _names(opt: go.Gluon, saved: dict[str, Any]) -> dict[int, str]:
    """Saved parameter id -> the parameter's name."""
    out: dict[int, str] = {}
    for group, saved_group in zip(opt.param_groups, saved["param_groups"], strict=True):
        for i, key in enumerate(saved_group["params"]):
            out[key] = group["param_names"][i]
    return out


# -- malformed dicts -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda sd: sd.pop("state"), ValueError, r"has no 'state'.*pass 'state': \{\}"),
        (lambda sd: sd.pop("param_groups"), ValueError, "has no 'param_groups'"),
        (lambda sd: sd.update(state=[]), TypeError, "'state' must be a dict"),
        (lambda sd: sd.update(param_groups={}), TypeError, "'param_groups' must be a list"),
        (lambda sd: sd["param_groups"].pop(), ValueError, r"has 4 group\(s\), the optimizer 5"),
        (
            lambda sd: sd["param_groups"][4]["params"].pop(),
            ValueError,
            r"param group 4's 'params' lists 1 parameter\(s\), the optimizer's group holds 2",
        ),
        (
            lambda sd: sd["param_groups"][4].update(params=[0, 0]),
            ValueError,
            r"parameter id 0 is listed twice in 'param_groups' \(param groups 0 and 4\)",
        ),
        (
            lambda sd: sd["param_groups"][0].update(params=[[0]]),
            ValueError,
            r"holds \[0\], which is no parameter id",
        ),
        (
            lambda sd: sd["state"].update({0: "junk"}),
            ValueError,
            "parameter 'embedding.weight': its state must be a dict",
        ),
    ],
)
def test_a_malformed_state_dict_is_refused_naming_the_key(
    mutate: Callable[[dict[str, Any]], Any], error: type[Exception], match: str
) -> None:
    model, opt = _stepped(CONFIGS["unscion"])
    bad = copy.deepcopy(opt.state_dict())
    mutate(bad)
    _refused(model, opt, bad, error, match)


def test_a_state_dict_that_is_no_dict_is_a_type_error() -> None:
    model, opt = _stepped(CONFIGS["unscion"])
    _refused(model, opt, [1, 2], TypeError, "expected a dict with 'state' and 'param_groups'")


# -- partial per-parameter state -------------------------------------------------------------------
def _cases() -> list[tuple[str, int, str]]:
    out = []
    for name, build in CONFIGS.items():
        _, opt = _stepped(build)
        saved = opt.state_dict()
        for key_id, entry in saved["state"].items():
            # Dropping a state's only key leaves it empty: a fresh start (tested below).
            if len(entry) > 1:
                out += [(name, key_id, key) for key in sorted(entry)]
    return out


@pytest.mark.parametrize(("config", "param", "key"), _cases())
def test_a_started_state_without_one_of_its_keys_is_refused_naming_key_and_parameter(
    config: str, param: int, key: str
) -> None:
    # Loaded, it would restart that buffer (or the step count and every schedule) silently.
    model, opt = _stepped(CONFIGS[config])
    bad = copy.deepcopy(opt.state_dict())
    name = _names(opt, bad)[param]
    del bad["state"][param][key]
    _refused(model, opt, bad, ValueError, f"parameter '{name}': state has no '{key}'")


def test_momentum_0_keeps_no_buffer_and_its_state_loads() -> None:
    model, opt = _stepped(CONFIGS["momentum-0"])
    saved = opt.state_dict()
    assert all(entry.keys() == {"step"} for entry in saved["state"].values())
    twin, twin_opt = _copy(model, opt, CONFIGS["momentum-0"])
    _step(model, opt, 2)
    _step(twin, twin_opt, 2)
    assert _same(_held(model, opt), _held(twin, twin_opt))


# -- empty state: a fresh start ------------------------------------------------------------------
@pytest.mark.parametrize("config", ["unscion", "muon", "gluon-mvr2", "limuon"])
@pytest.mark.parametrize("form", ["no entries", "every entry empty", "one entry empty"])
def test_an_empty_state_is_a_fresh_start_for_those_parameters(config: str, form: str) -> None:
    build = CONFIGS[config]
    model, opt = _stepped(build)
    saved = copy.deepcopy(opt.state_dict())
    ref_model, ref_opt = _copy(model, opt, build)
    first = saved["param_groups"][0]["params"][0]  # the state of the parameter popped below
    if form == "no entries":
        saved["state"] = {}
        ref_opt.state.clear()
    elif form == "every entry empty":
        saved["state"] = {key: {} for key in saved["state"]}
        ref_opt.state.clear()
    else:
        saved["state"][first] = {}
        ref_opt.state.pop(ref_opt.param_groups[0]["params"][0])
    opt.load_state_dict(saved)
    _step(model, opt, 2)
    _step(ref_model, ref_opt, 2)
    assert _same(_held(model, opt), _held(ref_model, ref_opt))


def test_a_state_at_step_0_is_a_placeholder_and_loads_as_fresh() -> None:
    # materialize_state's placeholders: a step count of 0 has not started, whatever else it has.
    build = CONFIGS["unscion"]
    model, opt = _stepped(build)
    saved = copy.deepcopy(opt.state_dict())
    ref_model, ref_opt = _copy(model, opt, build)
    first = saved["param_groups"][0]["params"][0]  # the state of the parameter popped below
    saved["state"][first] = {"step": torch.tensor(0.0)}
    ref_opt.state.pop(ref_opt.param_groups[0]["params"][0])
    opt.load_state_dict(saved)
    _step(model, opt, 2)
    _step(ref_model, ref_opt, 2)
    assert _same(_held(model, opt), _held(ref_model, ref_opt))


def test_a_float64_buffer_is_cast_to_the_parameters_dtype() -> None:
    build = CONFIGS["unscion"]
    model, opt = _stepped(build)
    saved = copy.deepcopy(opt.state_dict())
    ref_model, ref_opt = _copy(model, opt, build)
    first = next(iter(saved["state"]))
    saved["state"][first]["momentum_buffer"] = saved["state"][first]["momentum_buffer"].double()
    opt.load_state_dict(saved)
    _step(model, opt, 2)
    _step(ref_model, ref_opt, 2)
    assert _same(_held(model, opt), _held(ref_model, ref_opt))


# -- groups against the parameters -----------------------------------------------------------------
@pytest.mark.parametrize("config", ["unscion", "gluon-mvr2", "mars-approx"])
def test_a_loaded_norm_that_does_not_fit_a_vector_is_refused_as_construction_does(
    config: str,
) -> None:
    model, opt = _stepped(CONFIGS[config])
    bad = copy.deepcopy(opt.state_dict())
    index = next(i for i, g in enumerate(opt.param_groups) if g["role"] == "bias")
    bad["param_groups"][index]["norm"] = "spectral"
    _refused(
        model,
        opt,
        bad,
        ValueError,
        rf"load_state_dict: Parameter 'fc.bias' \(param group {index}, role 'bias'\): norm "
        "'spectral' needs a matrix",
    )
    # The construction check says the same of the same group.
    with pytest.raises(ValueError, match="Parameter 'fc.bias'.*norm 'spectral' needs a matrix"):
        go.Gluon([{"params": [("fc.bias", model.fc.bias)], "norm": "spectral"}])


def test_a_loaded_matrix_only_estimator_on_a_vector_is_refused() -> None:
    model, opt = _stepped(CONFIGS["unscion"])
    bad = copy.deepcopy(opt.state_dict())
    index = next(i for i, g in enumerate(opt.param_groups) if g["role"] == "bias")
    bad["param_groups"][index].update(estimator="storm_lowrank", two_point="approx")
    bad["state"] = {}
    _refused(model, opt, bad, ValueError, "Parameter 'fc.bias'.*estimator='storm_lowrank' needs")


def test_an_adamw_group_does_not_read_its_norm_so_that_loads() -> None:
    model, opt = _stepped(CONFIGS["muon"])
    saved = copy.deepcopy(opt.state_dict())
    index = next(i for i, g in enumerate(opt.param_groups) if g["role"] == "bias")
    saved["param_groups"][index]["norm"] = "spectral"
    opt.load_state_dict(saved)
    assert opt.param_groups[index]["norm"] == "spectral"
    _step(model, opt, 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "setting",
    ["transposed", "constrained", "ns_steps", "eps", "nesterov", "rank", "oversampling", "norm"],
)
def test_a_loaded_setting_that_is_a_tensor_is_refused_naming_the_setting(setting: str) -> None:
    model, opt = _stepped(CONFIGS["unscion"])
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][1][setting] = torch.tensor([1, 2])
    _refused(model, opt, bad, ValueError, rf"{setting}.*tensor\(\[1, 2\]\) \(param group 1")


# -- low-rank factors --------------------------------------------------------------------------
def test_low_rank_factors_of_different_ranks_are_refused() -> None:
    model, opt = _stepped(CONFIGS["limuon"])
    bad = copy.deepcopy(opt.state_dict())
    key = next(k for k, v in bad["state"].items() if "lowrank_s" in v)
    bad["state"][key]["lowrank_s"] = torch.ones(3)  # U and V have rank 2
    _refused(model, opt, bad, ValueError, "'lowrank_u' has shape .* the length of 'lowrank_s'")


def test_low_rank_factors_of_another_rank_than_the_group_load_and_step() -> None:
    # The group's rank changed since they were made: the next step reads them, stores rank 3.
    model, opt = _stepped(CONFIGS["limuon"])
    saved = copy.deepcopy(opt.state_dict())
    hidden = next(i for i, g in enumerate(opt.param_groups) if g["role"] == "hidden")
    saved["param_groups"][hidden]["rank"] = 3
    opt.load_state_dict(saved)
    _step(model, opt, 2)
    (p,) = opt.param_groups[hidden]["params"]
    assert opt.state[p]["lowrank_s"].shape == (3,)


# -- the campaign -------------------------------------------------------------------------------
def _campaign() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "state_faults.py"
    spec = importlib.util.spec_from_file_location("state_faults", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module


def test_the_state_fault_campaign_finds_no_partial_silent_or_unclear_outcome() -> None:
    tally = _campaign().campaign(configs=["muon", "gluon-mvr2", "limuon"])
    assert tally["faults"] > 100
    assert tally["partial"] == tally["silent"] == tally["tracebacks"] == 0, tally
    assert tally["refused"] + tally["accepted"] == tally["faults"]


def test_a_loaded_group_in_a_degenerate_approx_mode_is_refused() -> None:
    model, opt = _stepped(CONFIGS["gluon-mvr2"])
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][1]["two_point"] = "approx"
    bad["state"] = {}
    _refused(model, opt, bad, ValueError, r"estimator='mvr2' \(param group 1, role 'hidden'\)")
    bad["param_groups"][1]["allow_degenerate"] = True
    opt.load_state_dict(bad)
    assert opt.param_groups[1]["allow_degenerate"]
