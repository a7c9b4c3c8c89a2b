"""Mixture-of-experts models nobody here wrote, from tiny configs (random init, no downloads).

Mixtral, Qwen3-MoE, DeepSeek-V3 (MLA, shared experts) and GPT-OSS (transposed, interleaved
experts with biases, attention sinks) must build with the plain call under muon and both
Scions, give every parameter the role the docs state, reduce the loss of a fixed batch in five
steps, round-trip the state through ``torch.load(weights_only=True)``, and step every expert
as torch.optim.Muon steps that expert's matrix in its true (d_out, d_in) orientation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import gluon_optim as go
from _matrix import PRESETS, check_trains_and_round_trips, roles_of

transformers = pytest.importorskip("transformers")

VOCAB = 61
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


def _mixtral() -> nn.Module:
    cfg = transformers.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg)


def _qwen3_moe() -> nn.Module:
    cfg = transformers.Qwen3MoeConfig(
        **_COMMON, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=8
    )
    return transformers.Qwen3MoeForCausalLM(cfg)


def _deepseek_v3() -> nn.Module:
    cfg = transformers.DeepseekV3Config(
        **{**_COMMON, "num_key_value_heads": 4},
        moe_intermediate_size=24,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
        rope_scaling=None,
    )
    return transformers.DeepseekV3ForCausalLM(cfg)


def _gpt_oss() -> nn.Module:
    cfg = transformers.GptOssConfig(
        **_COMMON,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )
    return transformers.GptOssForCausalLM(cfg)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mixtral": _mixtral,
    "qwen3-moe": _qwen3_moe,
    "deepseek-v3": _deepseek_v3,
    "gpt-oss": _gpt_oss,
}
_LAYER = "model.layers.1"
EXPECTED: dict[str, dict[str, str]] = {
    "mixtral": {
        f"{_LAYER}.mlp.experts.gate_up_proj": "hidden",
        f"{_LAYER}.mlp.experts.down_proj": "hidden",
        f"{_LAYER}.mlp.gate.weight": "hidden",
        f"{_LAYER}.self_attn.k_proj.weight": "hidden",
    },
    "qwen3-moe": {
        f"{_LAYER}.mlp.experts.gate_up_proj": "hidden",
        f"{_LAYER}.mlp.gate.weight": "hidden",
        f"{_LAYER}.self_attn.q_norm.weight": "norm",
    },
    "deepseek-v3": {
        f"{_LAYER}.mlp.experts.gate_up_proj": "hidden",
        f"{_LAYER}.mlp.gate.weight": "hidden",
        f"{_LAYER}.mlp.shared_experts.up_proj.weight": "hidden",
        f"{_LAYER}.self_attn.q_a_proj.weight": "hidden",
        f"{_LAYER}.self_attn.kv_a_proj_with_mqa.weight": "hidden",
        f"{_LAYER}.self_attn.kv_a_layernorm.weight": "norm",
    },
    "gpt-oss": {
        f"{_LAYER}.mlp.experts.gate_up_proj": "hidden",
        f"{_LAYER}.mlp.experts.gate_up_proj_bias": "bias",
        f"{_LAYER}.mlp.experts.down_proj_bias": "bias",
        f"{_LAYER}.mlp.router.weight": "hidden",
        f"{_LAYER}.mlp.router.bias": "bias",
        f"{_LAYER}.self_attn.sinks": "bias",
    },
}
#: The stacks of experts, with whether they are stored (E, d_in, d_out).
STACKS: dict[str, bool] = {"mixtral": False, "qwen3-moe": False, "deepseek-v3": False}
STACKS["gpt-oss"] = True


def _batch() -> Tensor:
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))


def _loss(model: nn.Module, ids: Tensor) -> Tensor:
    out: Tensor = model(input_ids=ids, labels=ids).loss
    return out


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_roles_and_blocks_with_the_plain_call(name: str) -> None:
    model = _model(name)
    roles = roles_of(model)
    assert {n: roles[n] for n in EXPECTED[name]} == EXPECTED[name]
    blocks = {a.name: a.blocks for a in go.assign_roles(model)}
    stacks = {n for n, b in blocks.items() if b != "whole"}
    assert stacks == {n for n, p in model.named_parameters() if p.ndim == 3}
    assert all(blocks[n] == "experts" for n in stacks)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_five_steps_reduce_the_loss_and_the_state_round_trips(name: str, preset: str) -> None:
    ids = _batch()
    opt = check_trains_and_round_trips(MODELS[name], lambda m: _loss(m, ids), PRESETS[preset])
    text = go.describe(opt)
    assert "[experts: 4 units]" in text
    experts = [g for g in opt.param_groups if g["blocks"] == "experts"]
    assert len(experts) == 1 and experts[0]["transposed"] is STACKS[name]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_expert_steps_as_torch_muon_on_its_matrix(name: str) -> None:
    """One step of go.muon(model) on the model's own gradient; torch.optim.Muon on each expert's
    ``(d_out, d_in)`` matrix (``W[e].T`` for GPT-OSS) with the same gradient."""
    model = _model(name)
    transposed = STACKS[name]
    stacks = {n: p for n, p in model.named_parameters() if p.ndim == 3}
    lr = 0.02
    opt = go.muon(model, lr=lr, momentum=0.95, weight_decay=0.1)
    _loss(model, _batch()).backward()

    def matrices(t: Tensor) -> list[Tensor]:
        return [m.mT if transposed else m for m in t.detach().unbind(0)]

    ref = {n: [nn.Parameter(m.clone()) for m in matrices(p)] for n, p in stacks.items()}
    for n, p in stacks.items():
        assert p.grad is not None
        for r, g in zip(ref[n], matrices(p.grad), strict=True):
            r.grad = g.clone()
    ref_opt = torch.optim.Muon(
        [r for rs in ref.values() for r in rs],
        lr=lr,
        momentum=0.95,
        weight_decay=0.1,
        adjust_lr_fn="original",
    )
    opt.step()
    ref_opt.step()
    for n, p in stacks.items():
        for e, (got, want) in enumerate(zip(matrices(p), ref[n], strict=True)):
            bound = 4 * lr * math.sqrt(max(1.0, got.shape[0] / got.shape[1])) * 2**-8
            assert (got - want).abs().max().item() <= bound, (n, e)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_stack_read_as_one_flattened_matrix_takes_another_step(name: str) -> None:
    """What the oracle above guards against: with ``blocks="whole"`` a stack is flattened
    like a conv kernel into one ``(E, d_out * d_in)`` matrix, and each expert's update is
    far from its own matrix's (measured here: 0.72 to 0.92 of its size)."""
    updates = []
    for blocks in (None, {"*experts*": "whole"}):
        model = _model(name)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 3}
        opt = go.muon(model, lr=0.02, blocks=blocks) if blocks else go.muon(model, lr=0.02)
        _loss(model, _batch()).backward()
        opt.step()
        updates.append(
            {n: p.detach() - before[n] for n, p in model.named_parameters() if n in before}
        )
    for n, split in updates[0].items():
        flat = updates[1][n]
        assert ((flat - split).norm() / split.norm()).item() > 0.6, n


class _GQA(nn.Module):
    """A Phi-3-style attention: one ``qkv_proj`` with grouped-query sizes, ``[q; k; v]``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads = 4, 2
        self.qkv_proj = nn.Linear(32, (4 + 2 * 2) * 8, bias=False)
        self.gate_up_proj = nn.Linear(32, 96, bias=False)


@pytest.mark.parametrize(
    "fused,expected",
    [
        ("whole", {}),
        # Per projection the grouped-query blocks are unequal: it stays whole.
        ("projections", {"gate_up_proj.weight": "chunks=2"}),
        ("heads", {"qkv_proj.weight": "chunks=8", "gate_up_proj.weight": "chunks=2"}),
    ],
)
def test_fused_layouts_are_read_from_the_modules(fused: str, expected: dict[str, str]) -> None:
    got = {a.name: a.blocks for a in go.assign_roles(_GQA(), head=[], fused=fused)}
    assert {n: b for n, b in got.items() if b != "whole"} == expected


def test_fused_splits_gpt2_and_each_experts_gate_and_up() -> None:
    from _matrix import tiny_gpt2

    gpt2 = tiny_gpt2(VOCAB, n_layer=1, n_embd=32, n_positions=16)  # 2 heads, Conv1D c_attn
    by = {a.name: a for a in go.assign_roles(gpt2, fused="heads")}
    assert by["transformer.h.0.attn.c_attn.weight"].blocks == "chunks=6"
    assert by["transformer.h.0.attn.c_attn.weight"].transposed
    opt = go.muon(gpt2, fused="projections")
    group = next(g for g in opt.param_groups if g["blocks"] == "chunks=3")
    assert group["transposed"] and group["name"] == "hidden_transposed[chunks=3]"
    for name, split in (("mixtral", "experts+chunks=2"), ("gpt-oss", "experts+interleaved=2")):
        blocks = {a.name: a.blocks for a in go.assign_roles(_model(name), fused="projections")}
        assert blocks[f"{_LAYER}.mlp.experts.gate_up_proj"] == split
        assert blocks[f"{_LAYER}.mlp.experts.down_proj"] == "experts"
    with pytest.raises(ValueError, match="Unknown fused 'qkv'"):
        go.muon(gpt2, fused="qkv")
    # An explicit blocks= wins over fused=.
    opt = go.muon(gpt2, fused="heads", blocks={"*.c_attn.weight": "whole"})
    assert all(g["blocks"] == "whole" for g in opt.param_groups)


def test_limuon_refuses_a_low_rank_state_per_stack_and_trains_full_rank() -> None:
    """LiMuon's low-rank state factorises a whole parameter, not each expert: refused, with
    the full-rank option named; with it, the stacks train with STORM momentum per element."""
    model = _model("mixtral")
    with pytest.raises(ValueError, match=r"experts.gate_up_proj.*low_rank=False"):
        go.limuon(model)
    opt = go.limuon(model, low_rank=False)
    ids = _batch()

    def closure() -> Tensor:
        opt.zero_grad()
        loss = _loss(model, ids)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(4)]
    assert losses[-1] < losses[0], losses
