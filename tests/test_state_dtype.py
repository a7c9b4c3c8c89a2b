"""``state_dtype``: buffers stored narrower than the step computes, rounded once per step.

The oracle is the default optimizer whose state is rounded to bfloat16 (and kept in float32)
after every step: storing in bfloat16 and updating decoded copies must give the same bits.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gluon_optim as go
from conftest import TinyNet, lm_loss
from gluon_optim.storage import StoredState

Build = Callable[..., go.Gluon]
BUILDS: dict[str, Build] = {
    "muon": lambda m, **kw: go.muon(m, **kw),
    "muon-foreach": lambda m, **kw: go.muon(m, foreach=True, **kw),
    "unscion": lambda m, **kw: go.unscion(m, lr=0.01, **kw),
    "gluon-mvr2": lambda m, **kw: go.gluon_mvr(m, 2, lr=0.01, **kw),
    "gluon-mvr3-approx": lambda m, **kw: go.gluon(
        m, lr=0.01, estimator="mvr3", two_point="approx", allow_degenerate=True, **kw
    ),
    "limuon": lambda m, **kw: go.limuon(m, 3, lr=0.02, **kw),
}
#: State kept at the parameter's dtype whatever state_dtype says (the two-point buffers).
_KEEPS_DTYPE = {"step", "prev_param", "prev_grad", "prev_point_grad"}


def _batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 23, (4, 10), generator=gen) for _ in range(n)]


def _net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def _train(
    net: nn.Module,
    opt: go.Gluon,
    batches: list[torch.Tensor],
    after: Callable[[go.Gluon], None] | None = None,
) -> None:
    for x in batches:

        def closure(x: torch.Tensor = x) -> torch.Tensor:
            opt.zero_grad()
            loss = lm_loss(net, x)
            loss.backward()
            return loss

        opt.step(closure)
        if after is not None:
            after(opt)


def _round_state(opt: go.Gluon) -> None:
    """The oracle's rounding: every buffer the setting covers, to bfloat16 and back."""
    with torch.no_grad():
        for state in opt.state.values():
            for key, value in state.items():
                if key not in _KEEPS_DTYPE and isinstance(value, torch.Tensor):
                    value.copy_(value.to(torch.bfloat16))


@pytest.mark.parametrize("name", list(BUILDS))
def test_bfloat16_state_equals_the_step_with_its_state_rounded_after_every_step(name: str) -> None:
    build, batches = BUILDS[name], _batches(6)
    net, ref_net = _net(), _net()
    opt = build(net, state_dtype="bfloat16")
    ref = build(ref_net)
    _train(net, opt, batches)
    _train(ref_net, ref, batches, after=_round_state)
    for (n, p), q in zip(net.named_parameters(), ref_net.parameters(), strict=True):
        assert torch.equal(p, q), n
    for p, state in opt.state.items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            expected = p.dtype if key in _KEEPS_DTYPE and key != "step" else torch.bfloat16
            if key == "step":
                expected = torch.float32
            assert value.dtype == expected, (key, value.dtype)
            assert torch.equal(value.float(), ref.state[_same_param(ref, opt, p)][key].float())


def _same_param(ref: go.Gluon, opt: go.Gluon, p: torch.Tensor) -> torch.Tensor:
    """The parameter of ``ref`` at the position ``p`` has in ``opt``."""
    for g, h in zip(opt.param_groups, ref.param_groups, strict=True):
        for a, b in zip(g["params"], h["params"], strict=True):
            if a is p:
                return b
    raise KeyError("parameter not found")


@pytest.mark.parametrize("name", ["muon", "unscion", "gluon-mvr2"])
def test_bfloat16_state_halves_the_buffers_bytes(name: str) -> None:
    sizes = {}
    for setting in ("auto", "bfloat16"):
        net = _net()
        opt = BUILDS[name](net, state_dtype=setting)
        _train(net, opt, _batches(2))
        sizes[setting] = opt.state_bytes()
    assert sizes["bfloat16"]["momentum"] * 2 == sizes["auto"]["momentum"] > 0
    # The two-point buffers keep the parameters' dtype (docs/memory.md says why).
    assert sizes["bfloat16"]["two_point"] == sizes["auto"]["two_point"]


def test_the_default_is_the_parameters_dtype_and_float32_on_float32_is_the_same_run() -> None:
    a, b, c = _net(), _net(), _net()
    opts = [go.muon(a), go.muon(b, state_dtype="auto"), go.muon(c, state_dtype="float32")]
    for net, opt in zip((a, b, c), opts, strict=True):
        _train(net, opt, _batches(3))
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert opts[0].param_groups[0]["state_dtype"] == "auto"


def test_float32_state_for_bfloat16_parameters_is_updated_in_float32() -> None:
    net = _net().to(torch.bfloat16)
    opt = go.muon(net, state_dtype="float32")
    x = _batches(1)[0]
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = lm_loss(net, x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    dtypes = {k: v.dtype for s in opt.state.values() for k, v in s.items() if k != "step"}
    assert set(dtypes.values()) == {torch.float32}, dtypes
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())


@pytest.mark.parametrize("name", ["muon", "gluon-mvr2", "limuon"])
def test_a_checkpoint_resumes_bit_for_bit_and_keeps_the_state_narrow(name: str) -> None:
    build, batches = BUILDS[name], _batches(6)
    whole, part = _net(), _net()
    opt_whole = build(whole, state_dtype="bfloat16")
    _train(whole, opt_whole, batches)
    opt_part = build(part, state_dtype="bfloat16")
    _train(part, opt_part, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt_part.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _net()
    resumed.load_state_dict(saved["model"])
    opt = build(resumed, state_dtype="bfloat16")
    opt.load_state_dict(saved["opt"])
    # torch's loader casts state to the parameters' dtype; ours puts it back.
    narrow = {
        v.dtype
        for s in opt.state.values()
        for k, v in s.items()
        if isinstance(v, torch.Tensor) and k not in _KEEPS_DTYPE
    }
    assert narrow == {torch.bfloat16}
    _train(resumed, opt, batches[3:])
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_loaded_state_keeps_its_groups_setting_and_a_changed_one_rounds_at_the_next_step() -> (
    None
):
    net = _net()
    opt = go.muon(net)
    _train(net, opt, _batches(2))
    other_net = _net()
    other = go.muon(other_net, state_dtype="bfloat16")
    other.load_state_dict(opt.state_dict())
    # The saved groups come back with their settings, state_dtype too, as torch's loader does.
    assert {g["state_dtype"] for g in other.param_groups} == {"auto"}
    assert all(v.dtype == torch.float32 for s in other.state.values() for v in s.values())
    for group in other.param_groups:
        group["state_dtype"] = "bfloat16"
    _train(other_net, other, _batches(1))
    kept = {k: v.dtype for s in other.state.values() for k, v in s.items() if k != "step"}
    assert set(kept.values()) == {torch.bfloat16}, kept


def test_an_unknown_state_dtype_names_the_setting_and_its_values() -> None:
    with pytest.raises(ValueError, match=r"state_dtype.*'int4'.*auto.*float32.*bfloat16"):
        go.muon(_net(), state_dtype="int4")
    opt = go.muon(_net())
    saved = opt.state_dict()
    saved["param_groups"][0]["state_dtype"] = "float8"
    with pytest.raises(ValueError, match="state_dtype"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["state_dtype"] == "auto"


def test_the_stored_view_changes_nothing_before_commit_then_rounds_at_once() -> None:
    # The view's contract: nothing reaches the state before commit(), then writes round at once.
    state: dict[str, Any] = {"momentum_buffer": torch.ones(3, dtype=torch.bfloat16)}
    view = StoredState(state, ("momentum_buffer",), torch.bfloat16, torch.float32)
    work = view["momentum_buffer"]
    assert work.dtype == torch.float32
    work.add_(1e-3)  # below bfloat16's resolution at 1: rounds back to 1
    view["fresh"] = torch.zeros(())  # not a stored key: passes straight through
    assert torch.equal(state["momentum_buffer"], torch.ones(3, dtype=torch.bfloat16))
    assert "fresh" in state
    work.add_(0.1)
    view.commit()
    assert state["momentum_buffer"].dtype == torch.bfloat16
    assert torch.equal(state["momentum_buffer"], torch.full((3,), 1.1010, dtype=torch.bfloat16))
    view["momentum_buffer"] = torch.full((3,), 2.0)
    assert state["momentum_buffer"].dtype == torch.bfloat16
    assert float(state["momentum_buffer"][0]) == 2.0


def test_describe_and_the_groups_show_the_setting() -> None:
    opt = go.muon(_net(), state_dtype="bfloat16")
    assert {g["state_dtype"] for g in opt.param_groups} == {"bfloat16"}
    assert "state bfloat16" in go.describe(opt)
