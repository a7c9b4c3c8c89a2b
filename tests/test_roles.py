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


# -- rules for modules torch does not define ----------------------------------------------------
class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))


class TokenNet(nn.Module):
    """A ViT-style model: a class token, a positional embedding, layer scale, a bare bias."""

    def __init__(self, n: int = 5, d: int = 8) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, d))
        self.proj = nn.Linear(d, d)
        self.ls = LayerScale(d)
        self.bias = nn.Parameter(torch.zeros(d))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, n, d)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        x = x + self.ls.gamma * torch.tanh(self.proj(x)) + self.bias
        out: torch.Tensor = self.head(x.mean(1))  # every position gets a gradient
        return out


def test_bare_positions_tokens_and_scales_get_roles_by_name() -> None:
    roles = _roles(TokenNet())
    assert roles["cls_token"] == roles["pos_embed"] == "embedding"
    assert roles["ls.gamma"] == "norm" and roles["bias"] == "bias"


def test_a_positional_embedding_under_scion_normalises_each_position() -> None:
    model = TokenNet()
    opt = go.unscion(model, momentum=0.0)
    line = next(ln for ln in go.describe(opt).splitlines() if ln.startswith("pos_embed"))
    assert "colnorm (T)" in line and "1x6x8" in line
    before = model.pos_embed.detach().clone()
    model(torch.randn(4, 5, 8)).square().mean().backward()
    opt.step()
    rows = (model.pos_embed - before)[0]  # (positions, d): one input index per row
    norms = rows.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, norms[0].item()))
    # colnorm of the (d, positions) operand: every position moves by the same RMS, radius * 1.
    torch.testing.assert_close(rows.square().mean(dim=1).sqrt(), torch.full((6,), 0.018))


def test_norm_classes_are_recognised_by_name_and_structure() -> None:
    class MyRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    class Normalizer(MyRMSNorm):  # "Norm" followed by a lower-case letter: not a norm layer
        pass

    class MatrixNorm(nn.Module):  # holds a matrix: not a norm layer by this rule
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 4))

    for cls, ok in ((MyRMSNorm, True), (Normalizer, False), (MatrixNorm, False)):
        model = nn.Sequential(cls(), nn.Linear(4, 2))
        if ok:
            assert _roles(model, head=model[1])["0.weight"] == "norm"
        else:
            with pytest.raises(ValueError, match=f"{cls.__qualname__}: 1 parameter"):
                go.assign_roles(model, head=model[1])
        assert _roles(model, head=model[1], roles={cls: "norm"})["0.weight"] == "norm"


def test_heads_found_the_ways_libraries_expose_them() -> None:
    class Classifier(nn.Module):  # torchvision style: classifier = Sequential(Dropout, Linear)
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Linear(4, 8)
            self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 8), nn.Linear(8, 3))

    assert _roles(Classifier())["classifier.2.weight"] == "head"
    assert _roles(Classifier())["classifier.1.weight"] == "hidden"

    class Fc(nn.Module):  # ResNet style
        def __init__(self) -> None:
            super().__init__()
            self.body, self.fc = nn.Linear(4, 8), nn.Linear(8, 3)

    assert _roles(Fc())["fc.weight"] == "head"

    class Headless(nn.Module):  # timm style with num_classes=0: get_classifier() is Identity
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(4, 8), nn.Identity()

        def get_classifier(self) -> nn.Module:
            return self.head

    assert _roles(Headless()) == {"body.weight": "hidden", "body.bias": "bias"}


def test_unassigned_parameters_give_one_message_grouped_by_class() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(3))
            self.table = nn.Parameter(torch.ones(3, 3))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Odd() for _ in range(4))
            self.head = nn.Linear(3, 2)

    with pytest.raises(ValueError) as info:
        go.assign_roles(Net())
    text = str(info.value)
    assert "8 parameter(s) of Net have no role" in text
    assert text.count("Odd: 8 parameter(s)") == 1 and "(5 more)" in text
    assert "roles={'blocks.*.alpha': 'norm', 'blocks.*.table': 'hidden'}" in text


# -- presets' options compose --------------------------------------------------------------------
def test_any_group_key_overrides_the_presets_value(tiny: TinyNet) -> None:
    opt = go.scion(tiny, norm="auto", constrained=False)
    assert all(g["norm"] == "auto" for g in opt.param_groups)
    with pytest.raises(ValueError, match="transposed=True needs a matrix norm.*'conv.weight'"):
        go.scion(tiny, transposed=True)  # reaches every group; a conv kernel cannot be transposed
    opt = go.muon(tiny, settings={"head": {"lr": 1e-3}, "hidden": {"ns_steps": 3}})
    by_role = {g["role"]: g for g in opt.param_groups}
    assert by_role["head"]["lr"] == 1e-3 and by_role["embedding"]["lr"] == 3e-4
    assert by_role["hidden"]["ns_steps"] == 3 and by_role["conv"]["ns_steps"] == 5
    lim = go.limuon(tiny, settings={"conv": {"rank": 2}})
    assert {g["role"]: g.get("rank") for g in lim.param_groups}["conv"] == 2


def test_per_group_keys_are_refused_as_options(tiny: TinyNet) -> None:
    for key in ("role", "name"):
        with pytest.raises(ValueError, match=f"option '{key}' is set per group by the preset"):
            go.muon(tiny, **{key: "x"})
    with pytest.raises(ValueError, match=r"settings\['head'\]\['role'\]: set by the preset"):
        go.scion(tiny, settings={"head": {"role": "hidden"}})
    with pytest.raises(ValueError, match=r"settings\['mlp'\]: unknown role"):
        go.muon(tiny, settings={"mlp": {}})


def test_groups_are_named_by_role_and_accept_lr_scale(tiny: TinyNet) -> None:
    opt = go.muon(tiny)
    assert [g["name"] for g in opt.param_groups] == [g["role"] for g in opt.param_groups]
    opt = go.scion(tiny, settings={"hidden": {"name": "matrices"}})
    assert {g["role"]: g["name"] for g in opt.param_groups}["hidden"] == "matrices"
    groups = go.param_groups(tiny, "scion")
    for g in groups:
        g["lr_scale"] = 0.5  # timm's layer decay: its scheduler applies it to lr
    go.Gluon(groups, lr=0.01).step()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['lr_scal'\]"):
        go.Gluon([{**groups[0], "lr_scale": None, "lr_scal": 1}], lr=0.01)


@pytest.mark.parametrize("preset", go.PRESETS)
def test_no_group_key_makes_a_preset_raise_type_error(tiny: TinyNet, preset: str) -> None:
    """Every setting, passed to every preset at its default, builds or gets a ValueError that
    names it; never an internal TypeError (a key given twice to dict())."""
    factory = getattr(go, preset)
    for key, value in go.DEFAULTS.items():
        if key in ("name",):
            continue  # refused by design: test_per_group_keys_are_refused_as_options
        try:
            factory(tiny, **{key: value})
        except ValueError as err:
            assert key in str(err) or "momentum" in str(err), (key, err)


def test_wrapper_segments_are_dropped_from_names() -> None:
    from gluon_optim.roles import _plain_names

    assert _plain_names("_fsdp_wrapped_module.h.0._checkpoint_wrapped_module.w", False) == [
        "_fsdp_wrapped_module.h.0._checkpoint_wrapped_module.w",
        "h.0.w",
    ]
    assert _plain_names("module.fc.weight", True) == ["module.fc.weight", "fc.weight"]
    assert _plain_names("module.fc.weight", False) == ["module.fc.weight"]  # a real "module"
