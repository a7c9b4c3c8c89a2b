"""Roles from module types, with the head and embedding named; presets as plain data."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gluon_optim as go
from conftest import TiedNet, TinyNet


def _roles(model: nn.Module, **kwargs: object) -> dict[str, str]:
    return {a.name: a.role for a in go.assign_roles(model, **kwargs)}  # type: ignore[arg-type]


def test_roles_from_module_types(tiny: TinyNet) -> None:
    assert _roles(tiny) == {
        "embedding.weight": "embedding",
        "fc.weight": "hidden",
        "fc.bias": "bias",
        "ln.weight": "norm",
        "ln.bias": "norm",
        "conv.weight": "conv",
        "conv.bias": "bias",
        "head.weight": "head",
    }


def test_tied_embedding_gets_one_role_once(tied: TiedNet) -> None:
    roles = _roles(tied)
    assert roles == {"wte.weight": "tied", "block.weight": "hidden", "block.bias": "bias"}
    opt = go.unscion(tied)
    assert go.describe(opt).count("wte.weight") == 1
    group = next(g for g in opt.param_groups if g["role"] == "tied")
    assert group["norm"] == "sign" and group["scale"] == 3000.0 and not group["transposed"]


def test_untied_embedding_uses_colnorm_on_the_transpose(tiny: TinyNet) -> None:
    group = next(g for g in go.param_groups(tiny, "scion") if g["role"] == "embedding")
    assert group["norm"] == "colnorm" and group["transposed"] is True


def test_head_must_be_named() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="No head found for Sequential"):
        go.assign_roles(model)
    assert _roles(model, head=model[2]) == {
        "0.weight": "hidden",
        "0.bias": "bias",
        "2.weight": "head",
        "2.bias": "bias",
    }
    assert _roles(model, head=[])["2.weight"] == "hidden"


def test_parameter_without_a_rule_is_an_error_until_given_a_role() -> None:
    class WithPos(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 5, 4))
            self.head = nn.Linear(4, 2)

    model = WithPos()
    message = (
        r"(?s)1 parameter\(s\) of WithPos have no role.*WithPos: 1 parameter\(s\): "
        r"pos \(1, 5, 4\).*roles=\{'pos': 'embedding'\}"
    )
    with pytest.raises(ValueError, match=message):
        go.assign_roles(model)
    assert _roles(model, roles={"po*": "embedding"})["pos"] == "embedding"


def test_conflicting_and_unused_overrides(tiny: TinyNet) -> None:
    with pytest.raises(ValueError, match="'head.weight' is given two roles"):
        go.assign_roles(tiny, roles={"head.weight": "hidden"})
    with pytest.raises(ValueError, match=r"override\(s\) \['nothing.\*'\] match no trainable"):
        go.assign_roles(tiny, roles={"nothing.*": "hidden"})
    with pytest.raises(ValueError, match="is not a role"):
        go.assign_roles(tiny, roles={"fc.weight": "middle"})


def test_shared_weight_with_two_type_roles_is_an_error() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 6)
            self.proj = nn.Linear(6, 6, bias=False)
            self.proj.weight = self.emb.weight
            self.head = nn.Linear(6, 2)

    with pytest.raises(ValueError, match="shared by modules with different roles"):
        go.assign_roles(Shared())


def test_frozen_parameters_are_left_out(tiny: TinyNet) -> None:
    tiny.fc.requires_grad_(False)
    assert "fc.weight" not in _roles(tiny)


def test_attention_projections_are_hidden() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.head = nn.Linear(8, 3)

    roles = _roles(Attn())
    assert roles["attn.in_proj_weight"] == "hidden" and roles["attn.in_proj_bias"] == "bias"
    assert roles["attn.out_proj.weight"] == "hidden"


def test_groups_are_plain_data(tiny: TinyNet) -> None:
    for preset in go.PRESETS:
        for group in go.param_groups(tiny, preset):
            for key, value in group.items():
                if key == "params":
                    assert all(isinstance(n, str) and isinstance(p, nn.Parameter) for n, p in value)
                else:
                    assert isinstance(value, (str, float, int, bool, tuple)), (preset, key, value)
    with pytest.raises(ValueError, match="Unknown preset 'adam'"):
        go.param_groups(tiny, "adam")
    with pytest.raises(ValueError, match=r"scales\['mlp'\]: unknown role"):
        go.scion(tiny, scales={"mlp": 1.0})


def test_gluon_settings_override_one_role(tiny: TinyNet) -> None:
    opt = go.gluon(tiny, lr=0.01, settings={"hidden": {"scale": 50.0, "norm": "rownorm"}})
    hidden = next(g for g in opt.param_groups if g["role"] == "hidden")
    assert hidden["scale"] == 50.0 and hidden["norm"] == "rownorm"
    assert all(g["scale"] == 1.0 for g in opt.param_groups if g["role"] != "hidden")


def test_describe_table(tiny: TinyNet) -> None:
    text = go.describe(go.muon(tiny, lr=0.02))
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["param", "shape", "role", "update"]
    assert len(lines) == 2 + len(list(tiny.parameters()))
    assert any("fc.weight" in ln and "spectral/muon" in ln for ln in lines)
    assert any("head.weight" in ln and "adamw" in ln for ln in lines)
    scion = go.describe(go.scion(tiny))
    assert any(
        "embedding.weight" in ln and "colnorm (T)" in ln and "0.018" in ln
        for ln in scion.splitlines()
    )
