"""Fuzzing the invariant "every check runs before anything changes" (hypothesis).

Three properties, each over a few hundred random cases per run (a fixed seed, so CI is
repeatable; ``--hypothesis-seed=random`` explores further):

1. Random settings (valid, boundary and junk values of every declared setting) either build an
   optimizer whose steps keep finite parameters, or raise a ``ValueError`` that names a setting,
   and a step that raises has changed no parameter and no state.
2. Random mutations of a saved state dict either load, after which a step is finite or raises
   having changed nothing, or raise in ``load_state_dict`` with the optimizer untouched.
3. Random gradient scales 1e-30 to 1e30 in every compute dtype through every norm: finite
   directions, never outside the unit ball of the norm (Newton–Schulz: its known overshoot).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

import gluon_optim as go
from gluon_optim import settings as S

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
FUZZ = hypothesis.settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)

JUNK: list[Any] = [None, "x", -1, 0, 1, 2.5, -0.5, float("nan"), float("inf"), 1e300, True, (1,)]
#: Values of the wrong kind that compare elementwise: a setting's check must name the setting,
#: not raise "Boolean value of Tensor with more than one value is ambiguous".
TENSORS: list[Any] = [torch.tensor([1.0, 2.0]), torch.tensor([1, 2]), torch.tensor(0.5)]


def _pool(setting: S.Setting) -> list[Any]:
    """Values worth trying for one setting: its default and its edges (mostly valid)."""
    check = setting.check
    pool: list[Any] = [setting.default]
    if isinstance(check, S.Choice):
        pool += list(check.allowed())
    elif isinstance(check, S.Number):
        for edge in (check.lo, check.hi):
            if math.isfinite(edge):
                pool += [edge, edge + 1e-3, edge - 1e-3]
        pool += [0.5, 1e-8, 1e8]
    elif isinstance(check, S.Integer):
        pool += [v for v in (check.lo, check.hi) if v is not None] + [1, 3, 64]
    elif isinstance(check, S.Pair):
        pool += [(0.9, 0.99), (0.0, 0.0), (1.0, 0.5), (0.5,)]
    return pool


SETTINGS = [s for s in go.groups.SETTINGS if s.name not in ("name", "role")]
BY_NAME = {s.name: s for s in SETTINGS}
#: A group's fuzzed settings: setting name -> (junk?, index into the pool, mod its length).
fuzzed = st.dictionaries(
    st.sampled_from(sorted(BY_NAME)),
    st.tuples(st.sampled_from([False] * 5 + [True]), st.integers(0, 40)),
    max_size=4,
)


def _values(spec: dict[str, tuple[bool, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (junk, i) in spec.items():
        pool = JUNK if junk else _pool(BY_NAME[key])
        out[key] = pool[i % len(pool)]
    return out


def _snapshot(model: nn.Module, opt: go.Gluon) -> tuple[list[torch.Tensor], dict[str, Any]]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif isinstance(x, dict):
            if not (isinstance(y, dict) and _same_state(x, y)):
                return False
        elif isinstance(x, list):
            if not (isinstance(y, list) and len(x) == len(y)):
                return False
            for u, v in zip(x, y, strict=True):
                if isinstance(u, dict) and not _same_state(u, v):
                    return False
        elif x != y and not (isinstance(x, float) and math.isnan(x) and math.isnan(y)):
            return False
    return True


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(torch.tanh(self.fc(x)))
        return out


def _closure(model: nn.Module, opt: go.Gluon, scale: float) -> Any:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).square().mean() * scale
        loss.backward()
        return loss

    return closure


def _huge(opt: go.Gluon) -> bool:
    """Settings under which a second step may overflow by design (lr x scale near 1e30)."""
    for g in opt.param_groups:
        lr = float(g["lr"])
        if lr * max(g["scale"], 1.0) > 1e6 or lr * g["weight_decay"] > 1e3:
            return True
    return False


@FUZZ
@hypothesis.given(hidden=fuzzed, bias=fuzzed, exponent=st.integers(-30, 30))
def test_fuzzed_settings_build_and_step_or_raise_before_any_change(
    hidden: dict[str, tuple[bool, int]], bias: dict[str, tuple[bool, int]], exponent: int
) -> None:
    torch.manual_seed(0)
    model = Net()
    chosen = [_values(hidden), _values(bias)]
    groups = [
        {"params": [("fc.weight", model.fc.weight), ("out.weight", model.out.weight)], **chosen[0]},
        {"params": [("fc.bias", model.fc.bias)], "norm": "bias_rms", **chosen[1]},
    ]
    try:
        opt = go.Gluon(groups, lr=0.01)
    except (ValueError, TypeError) as err:
        # AdamW's pair is named as torch.optim.AdamW names it: "Invalid beta parameter".
        keys = {k.rstrip("s") if k == "betas" else k for k in {*chosen[0], *chosen[1]}}
        assert any(k in str(err) for k in keys), (chosen, err)
        hypothesis.event("refused at construction")
        return
    closure = _closure(model, opt, 10.0**exponent)
    for k in range(2):
        before = _snapshot(model, opt)
        try:
            if opt.needs_closure():
                opt.step(closure)
            else:
                closure()
                opt.step()
        except (ValueError, RuntimeError, FloatingPointError):
            params, state = _snapshot(model, opt)
            assert all(torch.equal(a, b) for a, b in zip(before[0], params, strict=True))
            assert _same_state(before[1]["state"], state["state"])
            hypothesis.event(f"step {k} raised, nothing changed")
            return
        if k == 0 or not _huge(opt):
            assert all(torch.isfinite(p).all() for p in model.parameters()), chosen
    hypothesis.event("two finite steps")


@hypothesis.settings(FUZZ, max_examples=120)
@hypothesis.given(
    changes=st.dictionaries(
        st.sampled_from(sorted(BY_NAME)),
        st.tuples(st.sampled_from(["pool", "junk", "tensor"]), st.integers(0, 40)),
        min_size=1,
        max_size=3,
    ),
    group=st.integers(0, 1),
    resize=st.sampled_from([None, (5,), (3, 3), ()]),
)
def test_settings_and_shapes_changed_between_steps_are_caught_before_any_change(
    changes: dict[str, tuple[str, int]], group: int, resize: tuple[int, ...] | None
) -> None:
    """What a training loop (or a bug) does to a live optimizer: set a group's values, or
    resize a parameter (``p.data = ...``). The next step runs finitely or raises a
    ``ValueError`` naming the setting or the parameter's shapes, having changed nothing."""
    torch.manual_seed(0)
    model = Net()
    opt = go.Gluon(
        [
            {"params": [("fc.weight", model.fc.weight), ("out.weight", model.out.weight)]},
            {"params": [("fc.bias", model.fc.bias)], "norm": "bias_rms"},
        ],
        lr=0.01,
    )
    closure = _closure(model, opt, 1.0)
    closure()
    opt.step()
    closure()  # the gradients of the next step, taken before any resize
    for key, (kind, i) in changes.items():
        pool = {"pool": _pool(BY_NAME[key]), "junk": JUNK, "tensor": TENSORS}[kind]
        opt.param_groups[group][key] = pool[i % len(pool)]
    if resize is not None:
        model.out.weight.data = torch.zeros(resize)
        model.out.weight.grad = torch.ones(resize)
    before = _snapshot(model, opt)
    try:
        opt.step()
    except (ValueError, RuntimeError) as err:
        # AdamW's pair is named as torch.optim.AdamW names it: "Invalid beta parameter".
        named = [k.rstrip("s") if k == "betas" else k for k in changes]
        named += ["shape"] if resize is not None else []
        assert isinstance(err, ValueError) and any(k in str(err) for k in named), (changes, err)
        params, state = _snapshot(model, opt)
        assert all(torch.equal(a, b) for a, b in zip(before[0], params, strict=True))
        assert _same_state(before[1]["state"], state["state"])
        hypothesis.event("the step refused, nothing changed")
        return
    assert resize is None, "a resized parameter was stepped"
    if not _huge(opt):
        assert all(torch.isfinite(p).all() for p in model.parameters()), changes
    hypothesis.event("a finite step")


# -- 2. state-dict mutations ----------------------------------------------------------------------
CONFIGS: list[dict[str, Any]] = [
    {},
    # MVR-1's approx mode is degenerate (M = g), opted into here for its prev_grad state.
    {"estimator": "mvr1", "two_point": "approx", "allow_degenerate": True},
    {"estimator": "mvr2", "two_point": "exact"},
    {"estimator": "storm_lowrank", "rank": 2, "two_point": "exact"},
    {"estimator": "mars", "two_point": "approx", "nesterov": False},
    {"algorithm": "adamw", "lr": 1e-3},
]
MUTATIONS = (
    "drop_key", "add_key", "wrong_shape", "nan", "int_dtype", "number", "string",
    "step", "swap", "drop_param", "group_junk", "group_drop", "group_params",
)  # fmt: skip
STEPS: list[Any] = [-1, 1.5, "x", float("nan"), 2, 10**12, torch.tensor([1.0, 2.0])]


def _stepped(config: dict[str, Any]) -> tuple[Net, go.Gluon, Any]:
    vector = {} if config.get("estimator") == "storm_lowrank" else config
    torch.manual_seed(0)
    model = Net()
    opt = go.Gluon(
        [
            {
                "params": [("fc.weight", model.fc.weight), ("out.weight", model.out.weight)],
                **config,
            },
            # The low-rank estimator is for matrices; the bias keeps the EMA there.
            {"params": [("fc.bias", model.fc.bias)], "norm": "bias_rms", **vector},
        ],
        lr=0.01,
    )
    closure = _closure(model, opt, 1.0)
    for _ in range(2):
        opt.step(closure)
    return model, opt, closure


def _mutate(saved: dict[str, Any], kind: str, pick: int) -> None:
    states = saved["state"]
    index = sorted(states)[pick % len(states)]
    state = states[index]
    tensors = sorted(k for k, v in state.items() if isinstance(v, torch.Tensor) and k != "step")
    key = tensors[pick % len(tensors)] if tensors else "step"
    group = saved["param_groups"][pick % len(saved["param_groups"])]
    if kind == "drop_key":
        state.pop(key)
    elif kind == "add_key":
        state["momentun"] = torch.zeros(1)
    elif kind == "wrong_shape":
        state[key] = torch.zeros(state[key].numel() + 1)
    elif kind == "nan":
        state[key] = torch.full_like(state[key], float("nan"))
    elif kind == "int_dtype":
        state[key] = state[key].to(torch.int64)
    elif kind == "number":
        state[key] = 0.5
    elif kind == "string":
        state[key] = "junk"
    elif kind == "step":
        state["step"] = STEPS[pick % len(STEPS)]
    elif kind == "swap":
        other = sorted(states)[(pick + 1) % len(states)]
        states[index], states[other] = states[other], states[index]
    elif kind == "drop_param":
        states.pop(index)
    elif kind == "group_junk":
        name = sorted(BY_NAME)[pick % len(BY_NAME)]
        group[name] = JUNK[pick % len(JUNK)]
    elif kind == "group_drop":
        group.pop(sorted(k for k in group if k != "params")[pick % (len(group) - 1)])
    elif kind == "group_params":
        group["params"] = group["params"][:-1] or [99]


@hypothesis.settings(FUZZ, max_examples=80)  # each example takes two optimizer steps first
@hypothesis.given(
    config=st.sampled_from(range(len(CONFIGS))),
    mutations=st.lists(
        st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 50)), min_size=1, max_size=2
    ),
)
def test_mutated_state_dicts_load_and_step_cleanly_or_are_refused_untouched(
    config: int, mutations: list[tuple[str, int]]
) -> None:
    model, opt, closure = _stepped(CONFIGS[config])
    saved = copy.deepcopy(opt.state_dict())
    for kind, pick in mutations:
        _mutate(saved, kind, pick)
    before = _snapshot(model, opt)
    try:
        opt.load_state_dict(saved)
    except (ValueError, TypeError) as err:
        assert str(err), mutations
        after = _snapshot(model, opt)
        assert _same_state(before[1], after[1]), (mutations, err)
        hypothesis.event("refused by load_state_dict, nothing changed")
        return
    before = _snapshot(model, opt)
    try:
        opt.step(closure)
    except (ValueError, RuntimeError, FloatingPointError):
        after = _snapshot(model, opt)
        assert all(torch.equal(a, b) for a, b in zip(before[0], after[0], strict=True))
        hypothesis.event("loaded; the step raised, nothing changed")
        return
    assert all(torch.isfinite(p).all() for p in model.parameters()), mutations
    hypothesis.event("loaded; finite step")


# -- 3. gradient scales in every dtype ------------------------------------------------------------
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@FUZZ
@hypothesis.given(
    name=st.sampled_from(sorted(go.norms.NORMS)),
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    exponent=st.floats(-30, 30),
    dtype=st.sampled_from(DTYPES),
    compute=st.sampled_from(["bfloat16", "float16", "float32", "float64"]),
    seed=st.integers(0, 2**16),
)
def test_an_lmo_of_a_finite_gradient_is_finite_and_inside_the_unit_ball(
    name: str, rows: int, cols: int, exponent: float, dtype: torch.dtype, compute: str, seed: int
) -> None:
    spectral = name in ("spectral", "spectral_conv")
    norm = go.norms.get(name, compute_dtype=compute) if spectral else go.norms.get(name)
    shape = (rows, cols, 3) if name == "spectral_conv" else (rows, cols)
    base = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = (base * 10.0**exponent).to(dtype)
    hypothesis.assume(bool(torch.isfinite(g).all()) and bool(g.ne(0).any()))
    d = norm.lmo(g)
    assert torch.isfinite(d).all()
    # Jordan's Newton-Schulz ends with singular values up to about 1.2 by design; every other
    # norm's LMO is on the unit sphere up to the gradient dtype's rounding.
    bound = 1.3 if spectral else 1.0 + 4 * torch.finfo(dtype).eps
    assert norm.norm(d.double()).amax().item() <= bound
