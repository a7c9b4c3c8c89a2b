"""Bad input: a clear error naming the option or parameter, raised before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gluon_optim as go
from conftest import TinyNet, lm_loss


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_unchanged(
    model: nn.Module, opt: torch.optim.Optimizer, snap: tuple[dict, dict]
) -> None:
    params, state = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), f"{k} changed"
    now = opt.state_dict()
    assert now["state"].keys() == state["state"].keys()
    for i, s in state["state"].items():
        for k, v in s.items():
            assert torch.equal(now["state"][i][k], v), f"state {i}/{k} changed"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"lr": float("nan")}, "Invalid learning rate"),
        ({"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must have one element"),
        ({"momentum": 1.0}, "Invalid momentum: 1.0"),
        ({"momentum": -0.1}, "Invalid momentum"),
        ({"scale": 0.0}, "Invalid scale: 0.0"),
        ({"weight_decay": -1e-3}, "Invalid weight_decay"),
        ({"norm": "spectal"}, "Unknown norm 'spectal'"),
        ({"shape_rule": "tall"}, "Unknown shape_rule 'tall'"),
        ({"radius_policy": "adaptive"}, "Unknown radius_policy 'adaptive'"),
        ({"radius": "l0l1"}, "option 'radius' was renamed to 'radius_policy'"),
        ({"estimator": "mvr4"}, "Unknown estimator 'mvr4'"),
        ({"nonfinite": "warn"}, "Unknown nonfinite 'warn'"),
        ({"polar_method": "qr"}, "Unknown polar_method 'qr'"),
        ({"ns_preset": "fast"}, "Unknown ns_preset 'fast'"),
        ({"ns_steps": 0}, "Invalid ns_steps: 0"),
        ({"compute_dtype": "int8"}, "Unknown compute_dtype 'int8'"),
        ({"nesterov": True, "momentum": 0.0}, "nesterov=True needs momentum > 0"),
        ({"radius_policy": "l0l1", "l0": 0.0, "l1": 0.0}, "needs l0 > 0 or l1 > 0"),
        ({"l1": -2.0}, "Invalid l1"),
        ({"constrained": "yes"}, "Invalid constrained"),
        ({"momentun": 0.9}, "unknown option"),
        ({"algorithm": "adamw", "betas": (0.9, 1.0)}, "Invalid beta parameter at index 1"),
        ({"algorithm": "adamw", "eps": 0.0}, "Invalid eps"),
    ],
)
def test_invalid_hyperparameters(kwargs: dict, message: str) -> None:
    p = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=message):
        go.Gluon([p], **kwargs)


def test_norm_that_does_not_fit_names_the_parameter(tiny: TinyNet) -> None:
    with pytest.raises(ValueError, match=r"Parameter 'fc.bias'.*needs a matrix"):
        go.Gluon([{"params": list(tiny.fc.named_parameters(prefix="fc")), "norm": "spectral"}])
    with pytest.raises(ValueError, match=r"'fc.weight'.*needs a conv kernel"):
        go.Gluon([("fc.weight", tiny.fc.weight)], norm="spectral_conv")
    with pytest.raises(ValueError, match="transposed=True needs a matrix norm"):
        go.Gluon([tiny.fc.bias], transposed=True)
    with pytest.raises(ValueError, match="muon takes matrices"):
        go.muon(list(tiny.parameters()))


def test_complex_and_integer_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="is complex"):
        go.Gluon([nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="need floating point"):
        go.Gluon([torch.zeros(3, 3, dtype=torch.int64)])


def test_invalid_group_leaves_optimizer_unchanged(tiny: TinyNet) -> None:
    opt = go.Gluon([tiny.fc.weight], lr=0.1)
    with pytest.raises(ValueError, match="Invalid momentum"):
        opt.add_param_group({"params": [tiny.head.weight], "momentum": 2.0})
    with pytest.raises(ValueError, match="already in another param group"):
        opt.add_param_group({"params": [tiny.fc.weight]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [tiny.head.weight], "norm": "sign", "lr": 0.5})
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5]


def test_hyperparameter_changed_after_construction_is_caught_at_step(tiny: TinyNet) -> None:
    opt = go.unscion(tiny, lr=0.01)
    x = torch.randint(0, 23, (2, 6))
    lm_loss(tiny, x).backward()
    opt.step()
    opt.param_groups[-1]["momentum"] = 1.5  # the last group: everything before it is valid
    snap = _snapshot(tiny, opt)
    with pytest.raises(ValueError, match=r"Invalid momentum: 1.5 \(param group \d+, role"):
        opt.step()
    _assert_unchanged(tiny, opt, snap)


def test_sparse_gradient_raises_before_any_update(tiny: TinyNet) -> None:
    opt = go.unscion(tiny, lr=0.01)
    lm_loss(tiny, torch.randint(0, 23, (2, 6))).backward()
    tiny.head.weight.grad = tiny.head.weight.grad.to_sparse()
    snap = _snapshot(tiny, opt)
    with pytest.raises(RuntimeError, match="'head.weight'.*sparse gradient"):
        opt.step()
    _assert_unchanged(tiny, opt, snap)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_and_changes_nothing(tiny: TinyNet, bad: float) -> None:
    opt = go.muon(tiny, lr=0.02)
    x = torch.randint(0, 23, (2, 6))
    lm_loss(tiny, x).backward()
    opt.step()  # create state first, so "nothing changed" covers it too
    opt.zero_grad()
    lm_loss(tiny, x).backward()
    tiny.conv.weight.grad[0, 0, 0] = bad  # a later group than several valid ones
    snap = _snapshot(tiny, opt)
    with pytest.raises(
        FloatingPointError, match=r"Non-finite gradient in parameter\(s\) \['conv.weight'\]"
    ):
        opt.step()
    _assert_unchanged(tiny, opt, snap)


def test_nonfinite_skip_leaves_that_group_untouched(tiny: TinyNet) -> None:
    opt = go.unscion(tiny, lr=0.01, nonfinite="skip")
    x = torch.randint(0, 23, (2, 6))
    lm_loss(tiny, x).backward()
    opt.step()
    opt.zero_grad()
    lm_loss(tiny, x).backward()
    tiny.fc.weight.grad[0, 0] = float("nan")
    fc_before = tiny.fc.weight.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[tiny.fc.weight].items()}
    head_before = tiny.head.weight.detach().clone()
    opt.step()
    assert torch.equal(tiny.fc.weight, fc_before)
    for k, v in opt.state[tiny.fc.weight].items():
        assert torch.equal(v, state_before[k]), k
    assert not torch.equal(tiny.head.weight, head_before), "other groups still step"
    assert torch.isfinite(tiny.head.weight).all()


@pytest.mark.parametrize("preset", ["muon", "limuon"])
def test_nonfinite_skip_reaches_the_adamw_groups_of_muon_and_limuon(
    tiny: TinyNet, preset: str
) -> None:
    # A setting of the whole optimizer: the preset's AdamW groups take it from the matrices'
    # options (they used to keep "raise", so a NaN in the embedding raised under "skip").
    opt = getattr(go, preset)(tiny, nonfinite="skip")
    assert {g["nonfinite"] for g in opt.param_groups} == {"skip"}
    x = torch.randint(0, 23, (2, 6))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = lm_loss(tiny, x)
        loss.backward()
        assert tiny.embedding.weight.grad is not None
        tiny.embedding.weight.grad[0, 0] = float("nan")
        return loss

    emb_before = tiny.embedding.weight.detach().clone()
    fc_before = tiny.fc.weight.detach().clone()
    opt.step(closure)
    assert torch.equal(tiny.embedding.weight, emb_before)
    assert not torch.equal(tiny.fc.weight, fc_before), "the other groups still step"


def test_nonfinite_ignore_does_not_check(tiny: TinyNet) -> None:
    opt = go.Gluon([tiny.fc.weight], lr=0.01, norm="euclidean", nonfinite="ignore")
    tiny.fc.weight.grad = torch.full_like(tiny.fc.weight, float("nan"))
    opt.step()
    assert torch.isnan(tiny.fc.weight).all()


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("transposed", "Invalid transposed: tensor"),
        ("constrained", "Invalid constrained: tensor"),
        ("ns_steps", "Invalid ns_steps: tensor"),
        ("eps", "Invalid eps: tensor"),
        ("nesterov", "Invalid nesterov: tensor"),
        ("rank", "Invalid rank: tensor"),
        ("oversampling", "Invalid oversampling: tensor"),
        ("rsvd_seed", "Invalid rsvd_seed: tensor"),
        ("norm", "Unknown norm tensor"),
        ("momentum", "Invalid momentum: tensor"),
    ],
)
def test_a_setting_replaced_by_a_tensor_gets_its_own_error_at_the_step(
    tiny: TinyNet, key: str, message: str
) -> None:
    # A flag or number compared with a many-element tensor raised "Boolean value of Tensor
    # ... is ambiguous" inside the step's cheap re-check instead of naming the setting.
    opt = go.unscion(tiny, lr=0.01)
    x = torch.randint(0, 23, (2, 6))
    lm_loss(tiny, x).backward()
    opt.step()
    opt.param_groups[1][key] = torch.tensor([1.0, 2.0])
    snap = _snapshot(tiny, opt)
    with pytest.raises(ValueError, match=rf"{message}\(\[1., 2.\]\) \(param group 1, role"):
        opt.step()
    _assert_unchanged(tiny, opt, snap)


def test_a_setting_given_as_a_tensor_is_refused_at_construction() -> None:
    p = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="Invalid ns_steps: tensor"):
        go.Gluon([p], ns_steps=torch.tensor([5, 5]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown estimator array"):
        go.Gluon([p], estimator=_Array(["ema", "mvr1"]))  # type: ignore[arg-type]


class _Array:
    """Compares elementwise, as a numpy array does: ``x in (...)`` on it would be ambiguous."""

    def __init__(self, items: list[str]) -> None:
        self.items = items

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("The truth value of an array with more than one element is ambiguous")

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"array({self.items})"


def test_a_parameter_resized_after_construction_is_refused_at_the_step(tiny: TinyNet) -> None:
    # The spectral LMO would otherwise take the resized matrix as a vector.
    opt = go.Gluon([("fc.weight", tiny.fc.weight)], lr=0.01)
    tiny.fc.weight.grad = torch.randn_like(tiny.fc.weight)
    opt.step()
    tiny.fc.weight.data = torch.zeros(5)
    tiny.fc.weight.grad = torch.ones(5)
    snap = _snapshot(tiny, opt)
    with pytest.raises(
        ValueError,
        match=r"Parameter 'fc.weight' \(param group 0\) has shape \(5,\), but it had shape "
        r"\(20, 12\) when it was given to the optimizer",
    ):
        opt.step()
    _assert_unchanged(tiny, opt, snap)


def test_a_parameter_resized_before_its_first_step_is_refused_too(tiny: TinyNet) -> None:
    opt = go.Gluon([("fc.weight", tiny.fc.weight)], lr=0.01)
    tiny.fc.weight.data = torch.zeros(20, 3)
    tiny.fc.weight.grad = torch.ones(20, 3)
    with pytest.raises(ValueError, match=r"has shape \(20, 3\), but it had shape \(20, 12\)"):
        opt.step()
    assert not opt.state[tiny.fc.weight]


def test_a_copied_optimizer_records_its_shapes_at_its_first_step(tiny: TinyNet) -> None:
    opt = go.Gluon([("fc.weight", tiny.fc.weight)], lr=0.01)
    twin = copy.deepcopy(opt)  # torch's __getstate__ keeps only defaults, state and groups
    (w,) = twin.param_groups[0]["params"]
    w.grad = torch.randn_like(w)
    twin.step()
    w.data = torch.zeros(4)
    w.grad = torch.ones(4)
    with pytest.raises(ValueError, match=r"has shape \(4,\), but it had shape \(20, 12\)"):
        twin.step()


@pytest.mark.parametrize(
    ("estimator", "reduces_to"),
    [("mvr1", "no momentum at all"), ("mvr2", "the EMA started at g"), ("mvr3", "mars_gamma=1")],
)
def test_a_degenerate_approx_group_is_refused_as_the_preset_refuses_it(
    tiny: TinyNet, estimator: str, reduces_to: str
) -> None:
    sentence = rf"two_point='approx' is not variance reduction for MVR-{estimator[-1]}: .*"
    group = {"params": [tiny.fc.weight], "estimator": estimator, "two_point": "approx"}
    with pytest.raises(ValueError, match=rf"estimator='{estimator}' \(new param group\): "):
        go.Gluon([group])
    with pytest.raises(ValueError, match=sentence + reduces_to):
        go.Gluon([group])
    with pytest.raises(ValueError, match="gluon_mvr: " + sentence + reduces_to):
        go.gluon_mvr(tiny, int(estimator[-1]), two_point="approx")
    # A group built by hand says the same as the preset: one sentence, shared.
    from gluon_optim.estimators import approx_reduction

    with pytest.raises(ValueError) as by_hand:
        go.Gluon([group])
    with pytest.raises(ValueError) as by_preset:
        go.gluon_mvr(tiny, int(estimator[-1]), two_point="approx")
    assert approx_reduction(estimator) in str(by_hand.value)
    assert approx_reduction(estimator) in str(by_preset.value)


def test_the_degenerate_approx_mode_is_refused_on_every_path_before_any_change(
    tiny: TinyNet,
) -> None:
    with pytest.raises(ValueError, match="limuon: low_rank=False is estimator='mvr1', and "):
        go.limuon(tiny, low_rank=False, two_point="approx")
    with pytest.raises(ValueError, match="not variance reduction for MVR-1"):
        go.gluon(tiny, estimator="mvr1", two_point="approx")
    opt = go.Gluon([tiny.fc.weight], lr=0.01, estimator="mvr1", two_point="exact")
    with pytest.raises(ValueError, match="not variance reduction for MVR-2"):
        opt.add_param_group(
            {"params": [tiny.head.weight], "estimator": "mvr2", "two_point": "approx"}
        )
    assert len(opt.param_groups) == 1
    # Switched to it between steps: refused at the step, nothing changed.
    x = torch.randint(0, 23, (2, 6))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = lm_loss(tiny, x)
        loss.backward()
        return loss

    opt.step(closure)
    opt.param_groups[0]["two_point"] = "approx"
    closure()
    snap = _snapshot(tiny, opt)
    with pytest.raises(ValueError, match=r"estimator='mvr1' \(param group 0\): two_point='approx'"):
        opt.step()
    _assert_unchanged(tiny, opt, snap)
    # Loaded from a state dict: refused before anything is loaded.
    opt.param_groups[0]["two_point"] = "exact"
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["two_point"] = "approx"
    bad["state"] = {}
    snap = _snapshot(tiny, opt)
    with pytest.raises(ValueError, match="not variance reduction for MVR-1"):
        opt.load_state_dict(bad)
    _assert_unchanged(tiny, opt, snap)


def test_allow_degenerate_opts_into_the_reduction(tiny: TinyNet) -> None:
    # Tests and ablations that show the reduction say so, in plain data that a state dict keeps.
    opt = go.gluon(tiny, estimator="mvr1", two_point="approx", allow_degenerate=True)
    assert all(g["allow_degenerate"] for g in opt.param_groups)
    go.gluon_mvr(tiny, 3, two_point="approx", allow_degenerate=True)
    go.limuon(tiny, low_rank=False, two_point="approx", allow_degenerate=True)
    fresh = go.gluon(tiny, estimator="mvr1", two_point="approx", allow_degenerate=True)
    fresh.load_state_dict(opt.state_dict())


def test_a_failed_direction_stage_leaves_adamw_groups_untouched(
    tiny: TinyNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # AdamW groups take their whole step after the direction stage, so a direction that fails
    # (a compiler error, a distributed owner) cannot have moved them. (The LMO groups' momenta
    # have been updated by then: the estimator stage precedes the directions.)
    matrices = [p for p in tiny.parameters() if p.ndim == 2]
    vectors = [p for p in tiny.parameters() if p.ndim != 2]
    opt = go.Gluon([{"params": matrices}, {"params": vectors, "algorithm": "adamw"}], lr=0.01)
    x = torch.randint(0, 23, (4, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # a started state, so the moments and step counts exist to compare
        lm_loss(tiny, x).backward()
        opt.step()
    lm_loss(tiny, x).backward()
    before = [p.detach().clone() for p in vectors]
    moments = [{k: v.clone() for k, v in opt.state[p].items()} for p in vectors]

    def fail(requests: object) -> None:
        raise RuntimeError("direction stage failed (injected)")

    monkeypatch.setattr(opt.executor, "directions", fail)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    for p, old, state in zip(vectors, before, moments, strict=True):
        assert torch.equal(p, old)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
