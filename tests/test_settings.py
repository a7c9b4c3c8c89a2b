"""The settings table: declared once, and everything that depends on it agrees with it."""

from __future__ import annotations

import copy
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

import gluon_optim as go
from gluon_optim import groups
from gluon_optim.estimators import ESTIMATORS
from gluon_optim.radius import POLICIES

DOCS = Path(__file__).parent.parent / "docs" / "optimizer.md"


def test_typed_signature_lists_exactly_the_declared_settings() -> None:
    hints = typing.get_type_hints(groups.GroupSettings)
    assert set(hints) == {s.name for s in groups.SETTINGS}
    assert set(typing.get_type_hints(groups.GroupOptions)) == set(hints) - {"lr"}


def test_every_setting_is_declared_once_and_its_default_passes_its_check() -> None:
    names = [s.name for s in groups.SETTINGS]
    assert len(names) == len(set(names))
    for s in groups.SETTINGS:
        assert s.error(s.default) is None, s.name
    groups.validate(groups.DEFAULTS, None)


def test_owners_declare_the_settings_they_read() -> None:
    # A setting an estimator or policy declares names it under `applies`.
    for owner in [*ESTIMATORS.values(), *POLICIES.values()]:
        for s in owner.settings:
            assert owner.name in s.applies, (owner.name, s.name)


def test_docs_tables_are_generated_from_the_declarations() -> None:
    text = DOCS.read_text()
    assert groups.render_docs(text) == text, (
        "docs/optimizer.md is out of date: run `make docs-tables`"
    )
    for s in groups.SETTINGS:
        assert f"| `{s.name}` |" in text


def test_renamed_key_names_its_replacement_everywhere() -> None:
    p = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="'radius' was renamed to 'radius_policy'"):
        go.Gluon([p], radius="l0l1")  # type: ignore[call-arg]
    opt = go.Gluon([p])
    with pytest.raises(ValueError, match="'radius' was renamed to 'radius_policy'"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))], "radius": "constant"})
    with pytest.raises(ValueError, match="estimator='storm'.*replaced in 0.2.0 by 'mvr1'"):
        go.Gluon([p], estimator="storm")
    with pytest.raises(ValueError, match="limuon: pass LiMuon's beta as beta="):
        go.limuon([p], momentum=0.1)


def test_name_key_is_accepted_for_lr_monitors() -> None:
    p = nn.Parameter(torch.randn(4, 3))
    opt = go.Gluon([{"params": [p], "name": "matrices"}])
    assert opt.param_groups[0]["name"] == "matrices"
    with pytest.raises(ValueError, match="Invalid name: 3"):
        go.Gluon([{"params": [p], "name": 3}])


def _stepped(**options: object) -> tuple[nn.Parameter, go.Gluon]:
    p = nn.Parameter(torch.randn(6, 4))
    opt = go.Gluon([p], lr=0.1, **options)  # type: ignore[arg-type]
    p.grad = torch.randn(6, 4)
    opt.step()
    return p, opt


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr", -0.5, "Invalid learning rate: -0.5 .param group 0"),  # per step
        ("momentum", 1.0, r"Invalid momentum: 1.0 .param group 0.*in \[0, 1\)"),  # per step
        ("estimator", "mvr9", "Unknown estimator 'mvr9' .param group 0"),  # changed value
        ("ns_steps", 0, "Invalid ns_steps: 0"),  # changed value
        ("nesterov", True, "nesterov=True needs momentum > 0"),  # a rule
    ],
)
def test_values_changed_between_steps_are_checked_before_any_change(
    key: str, value: object, message: str
) -> None:
    p, opt = _stepped(momentum=0.0)
    before, state = p.detach().clone(), copy.deepcopy(opt.state[p])
    opt.param_groups[0][key] = value
    p.grad = torch.randn(6, 4)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert torch.equal(p, before)
    assert opt.state[p].keys() == state.keys()
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


def test_load_state_dict_validates_first_and_changes_nothing() -> None:
    p, opt = _stepped()
    saved = opt.state_dict()
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["shape_rule"] = "tall"
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="Unknown shape_rule 'tall' .param group 0"):
        opt.load_state_dict(bad)
    assert opt.state_dict()["param_groups"] == before["param_groups"]
    unknown = copy.deepcopy(saved)
    unknown["param_groups"][0]["warmup"] = 3
    with pytest.raises(ValueError, match=r"param group 0 got unknown option\(s\) \['warmup'\]"):
        opt.load_state_dict(unknown)


def test_a_0_1_0_checkpoint_is_upgraded() -> None:
    # 0.1.0 saved `radius`, and LiMuon's beta (the fresh gradient's weight) as `momentum`.
    w = nn.Parameter(torch.randn(6, 4))
    opt = go.Gluon([w], estimator="mvr1", momentum=0.75, two_point="approx", allow_degenerate=True)
    w.grad = torch.randn(6, 4)
    opt.step()
    old = opt.state_dict()
    group = old["param_groups"][0]
    group.pop("radius_policy")
    group.pop("name")
    group.update(radius="constant", estimator="storm", momentum=0.25)
    fresh = go.Gluon([nn.Parameter(w.detach().clone())], two_point="approx")
    fresh.load_state_dict(old)
    loaded = fresh.param_groups[0]
    assert (loaded["estimator"], loaded["momentum"], loaded["radius_policy"]) == (
        "mvr1",
        0.75,
        "constant",
    )
    assert "radius" not in loaded


def test_adamw_groups_equal_torch_adamw_with_a_tensor_lr() -> None:
    # Our AdamW groups call torch's own functional update, so even a tensor lr (which torch
    # reads to the host) gives torch.optim.AdamW's iterates bit for bit.
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(5, 3, generator=gen)
    ours, theirs = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    kw = dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt = go.Gluon([ours], lr=torch.tensor(0.01), algorithm="adamw", **kw)  # type: ignore[arg-type]
    ref = torch.optim.AdamW([theirs], lr=torch.tensor(0.01), foreach=False, **kw)  # type: ignore[arg-type]
    for _ in range(4):
        g = torch.randn(5, 3, generator=gen)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(ours, theirs)


def test_mypy_catches_a_misspelled_or_mistyped_option(tmp_path: Path) -> None:
    from mypy import api

    snippet = tmp_path / "user_code.py"
    snippet.write_text(
        "import torch\n"
        "import gluon_optim as go\n"
        "p = torch.nn.Parameter(torch.randn(3, 3))\n"
        "go.Gluon([p], lr=0.1, momentun=0.9)\n"
        "go.Gluon([p], lr=0.1, momentum='high')\n"
        "go.Gluon([p], lr=0.1, radius_policy='l0l1', l1=3.0, nesterov=False)\n"
    )
    out, _, status = api.run(
        ["--strict", "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", str(snippet)]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1
    assert len(errors) == 2, out
    assert 'user_code.py:4: error: Unexpected keyword argument "momentun"' in errors[0]
    assert "user_code.py:5:" in errors[1] and '"momentum"' in errors[1]
