"""The lab's models: shapes, roles, training signal, options and error messages."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gluon_optim as go
from gluon_optim.lab.models import (
    CNN,
    GPT,
    MODELS,
    CNNConfig,
    GPTConfig,
    ModelSpec,
    ViT,
    build_model,
    model_config,
    model_task,
)
from gluon_optim.lab.models.gpt import apply_rope

# Small inputs per preset: overrides for build_model and the input shape. gpt-small keeps its
# width and depth (it is the shape under test) but sees short sequences.
DIGITS = dict(num_classes=10, in_channels=1, image_size=8)
CASES: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "gpt-tiny": ({"vocab_size": 256}, (2, 64)),
    "gpt-small": ({"vocab_size": 256}, (2, 16)),
    "moe-tiny": ({"vocab_size": 256}, (2, 32)),
    "cnn-small": (DIGITS, (3, 1, 8, 8)),
    "vit-tiny": ({"num_classes": 10, "in_channels": 3, "image_size": 32}, (3, 3, 32, 32)),
}


def make_input(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if model_task(name) == "lm":
        return torch.randint(0, 256, shape)
    return torch.randn(shape)


def roles_of(model: nn.Module) -> dict[str, str]:
    return {a.name: a.role for a in go.assign_roles(model)}


def test_every_preset_is_covered_here() -> None:
    assert set(MODELS) == set(CASES) | {"gpt2-124m"}
    for name, spec in MODELS.items():
        assert isinstance(spec, ModelSpec)
        assert spec.task in ("lm", "image")
        assert model_task(name) == spec.task


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_shape(name: str) -> None:
    overrides, shape = CASES[name]
    model = build_model(name, **overrides)
    out = model(make_input(name, shape))
    if model_task(name) == "lm":
        assert out.shape == (*shape, 256)
    else:
        assert out.shape == (shape[0], 10)
    assert torch.isfinite(out).all()


def test_gpt_tiny_starts_near_uniform() -> None:
    # N(0, 0.02) weights make the first logits nearly flat: loss ~ ln(vocab).
    model = build_model("gpt-tiny", vocab_size=256)
    x = torch.randint(0, 256, (4, 33))
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.05


def test_gpt2_124m_parameter_count() -> None:
    # Built on the meta device: the shapes are real, no memory is allocated and no forward runs.
    with torch.device("meta"):
        model = build_model("gpt2-124m")
    assert isinstance(model, GPT)
    assert model.lm_head.weight is model.wte.weight
    n = sum(p.numel() for p in model.parameters())  # the tied matrix counted once
    assert 123.5e6 < n < 125e6, n
    roles = roles_of(model)
    assert roles["wte.weight"] == "tied" and roles["wpe.weight"] == "embedding"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_roles_need_no_arguments(name: str) -> None:
    overrides = CASES.get(name, ({}, ()))[0]
    if name == "gpt2-124m":
        with torch.device("meta"):
            model = build_model(name)
    else:
        model = build_model(name, **overrides)
    roles = roles_of(model)
    assert len(roles) == len(list(model.parameters()))
    assert model.head is not None
    head_role = roles[next(n for n, p in model.named_parameters() if p is model.head.weight)]
    if isinstance(model, GPT):
        assert model.embedding is model.wte
        tied = model.config.tied
        assert head_role == ("tied" if tied else "head")
        assert roles["wte.weight"] == ("tied" if tied else "embedding")
        expected = {"hidden", "norm"} | ({"tied"} if tied else {"head", "embedding"})
        if model.wpe is not None:
            assert roles["wpe.weight"] == "embedding"
            expected.add("embedding")
        assert set(roles.values()) == expected
    elif isinstance(model, CNN):
        assert model.embedding is None
        assert head_role == "head"
        assert set(roles.values()) == {"conv", "norm", "head"}
    else:
        assert isinstance(model, ViT) and model.embedding is None
        assert head_role == "head"
        # patch conv, its bias and the head's, attention/MLP matrices, LayerNorms, positions
        assert set(roles.values()) == {"conv", "bias", "hidden", "norm", "head", "embedding"}


def _tiny_task(name: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """A model and a loss on one fixed small batch."""
    if name in ("gpt-tiny", "moe-tiny"):
        model = build_model(name, vocab_size=256)
        x = torch.randint(0, 256, (8, 33))
        return model, lambda m: F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    extra = {"patch_size": 2} if name == "vit-tiny" else {}
    model = build_model(name, **DIGITS, **extra)
    images, labels = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    return model, lambda m: F.cross_entropy(m(images), labels)


# A constant-radius LMO step does not shrink near a minimum; Scion's lr 0.00036 fits a batch of
# 16 so fast that the ViT then overshoots by step 30, so the check uses a smaller lr.
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "unscion": lambda m: go.unscion(m, lr=0.0002),
    "muon": lambda m: go.muon(m, lr=0.02, adamw_lr=3e-3),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name", ["gpt-tiny", "moe-tiny", "cnn-small", "vit-tiny"])
def test_loss_falls_on_a_fixed_batch(name: str, opt_name: str) -> None:
    model, loss_fn = _tiny_task(name)
    opt = OPTIMIZERS[opt_name](model)
    first = loss_fn(model).item()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        opt.step()
    last = loss_fn(model).item()
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("rope", [False, True])
def test_gpt_variants_run_and_are_causal(tied: bool, rope: bool) -> None:
    model = build_model("gpt-tiny", vocab_size=64, n_layer=3, tied=tied, rope=rope)
    assert isinstance(model, GPT)
    assert (model.wpe is None) == rope
    assert (model.lm_head.weight is model.wte.weight) == tied
    x = torch.randint(0, 64, (2, 20))
    logits = model(x)
    assert logits.shape == (2, 20, 64)
    logits.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # Changing token 10 must leave the logits of positions 0..9 exactly as they were.
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 64
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_rope_is_a_rotation_by_relative_position() -> None:
    q, k = torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)
    rq, rk = apply_rope(q), apply_rope(k)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # a rotation keeps lengths
    torch.testing.assert_close(rq[:, :, 0], q[:, :, 0])  # position 0 is not rotated
    # Same query and key vectors placed at positions (i, j) and (i + s, j + s): same score.
    v_q, v_k = torch.randn(8), torch.randn(8)
    seq_q, seq_k = torch.zeros(1, 1, 12, 8), torch.zeros(1, 1, 12, 8)
    seq_q[..., 2, :], seq_k[..., 5, :] = v_q, v_k
    seq_q[..., 6, :], seq_k[..., 9, :] = v_q, v_k
    rq, rk = apply_rope(seq_q)[0, 0], apply_rope(seq_k)[0, 0]
    torch.testing.assert_close(rq[2] @ rk[5], rq[6] @ rk[9])


def test_gpt_dropout_trains_and_evaluates() -> None:
    model = build_model("gpt-tiny", vocab_size=32, dropout=0.1)
    x = torch.randint(0, 32, (2, 16))
    model.train()
    model(x).sum().backward()
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_sequence_longer_than_block_size_raises() -> None:
    model = build_model("gpt-tiny", vocab_size=32, block_size=16)
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence length 17 exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_cnn_skips_pools_on_small_images() -> None:
    # 8x8 through four groups: 8 -> 4 -> 2 -> 1 -> (no pool) 1.
    model = build_model("cnn-small", **DIGITS, widths=[8, 8, 8, 16])
    assert isinstance(model, CNN) and model.config.widths == (8, 8, 8, 16)
    pools = [isinstance(g[-1], nn.MaxPool2d) for g in model.groups]
    assert pools == [True, True, True, False]
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    avg = build_model("cnn-small", **DIGITS, pool="avg", logit_scale=1 / 9)
    assert avg(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_cnn_eval_mode_uses_running_statistics() -> None:
    model = build_model("cnn-small", **DIGITS)
    x = torch.randn(4, 1, 8, 8)
    model(x)
    model.eval()
    torch.testing.assert_close(model(x[:1]), model(x)[:1])  # no batch dependence in eval


def test_vit_checks_image_size() -> None:
    model = build_model("vit-tiny", **DIGITS, patch_size=2)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="expected 8x8 images"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build_model("vit-tiny", image_size=10, patch_size=4)


def test_unknown_preset_raises_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'gpt-huge'") as info:
        build_model("gpt-huge")
    for name in MODELS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown model"):
        model_task("resnet")


def test_unknown_override_raises_with_the_valid_fields() -> None:
    with pytest.raises(ValueError, match="has no field.*n_layers") as info:
        build_model("gpt-tiny", n_layers=3)
    for field in dataclasses.fields(GPTConfig):
        assert field.name in str(info.value)
    with pytest.raises(ValueError, match="valid overrides: in_channels"):
        build_model("cnn-small", vocab_size=10)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("gpt-tiny", {"n_head": 3}, "not divisible by n_head"),
        ("gpt-tiny", {"n_embd": 66, "n_head": 6, "rope": True}, "even head size"),
        ("gpt-tiny", {"dropout": 1.0}, "dropout"),
        ("moe-tiny", {"top_k": 5}, "1 <= top_k <= n_expert"),
        ("gpt-tiny", {"n_expert": -1}, "n_expert >= 0"),
        ("cnn-small", {"widths": ()}, "widths"),
        ("cnn-small", {"pool": "median"}, "pool"),
        ("vit-tiny", {"heads": 5}, "not divisible by heads"),
    ],
)
def test_invalid_config_raises(name: str, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(name, **overrides)


def test_overrides_leave_the_presets_alone() -> None:
    before = MODELS["gpt-tiny"].config
    config = model_config("gpt-tiny", n_layer=5, tied=True)
    assert isinstance(config, GPTConfig) and config.n_layer == 5 and config.tied
    assert MODELS["gpt-tiny"].config == before and before.n_layer == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.n_layer = 3  # type: ignore[misc]
    assert isinstance(MODELS["cnn-small"].config, CNNConfig)


def test_moe_tiny_routes_each_token_to_its_top_k_experts_only() -> None:
    """The per-expert stacks get the per-expert step, and an expert no token chose gets no
    gradient (its rows are indexed, not multiplied by a zero weight)."""
    from gluon_optim.lab.models.gpt import MoE

    torch.manual_seed(0)
    model = build_model("moe-tiny", vocab_size=256)
    blocks = {a.name: a.blocks for a in go.assign_roles(model)}
    assert blocks["blocks.0.mlp.experts.gate_up_proj"] == "experts"
    assert blocks["blocks.0.mlp.experts.down_proj"] == "experts"
    assert blocks["blocks.0.mlp.router.weight"] == "whole"
    moe = model.blocks[0].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(1, 3, 64)
    with torch.no_grad():  # route every token away from expert 3
        moe.router.weight[3] = -10.0 * x[0].sum(0) / x[0].sum(0).norm()
    moe(x).sum().backward()
    grad = moe.experts.gate_up_proj.grad
    assert grad is not None and grad[3].abs().max() == 0 and grad[:3].abs().max() > 0
    # The output is the top-2 softmax mixture of the experts, computed here by hand.
    with torch.no_grad():
        flat = x.reshape(3, 64)
        logits = moe.router(flat)
        top, chosen = logits.topk(2, dim=-1)
        w = top.softmax(-1)
        want = torch.zeros_like(flat)
        for n in range(3):
            for j in range(2):
                e = int(chosen[n, j])
                gate, up = (flat[n] @ moe.experts.gate_up_proj[e].T).chunk(2)
                want[n] += w[n, j] * (F.silu(gate) * up) @ moe.experts.down_proj[e].T
        assert torch.allclose(moe(x).reshape(3, 64), want, atol=1e-6)
